"""Which vendor BLAS library runs the plain linears of a forward of a given token count.

torch calls cuBLAS (hipBLAS/rocBLAS on ROCm) for a bf16 linear unless told to prefer cuBLASLt
(hipBLASLt). Their heuristics pick different kernels for the skinny shapes of a decode step:
on an H200, cuBLASLt ran Llama-3-8B's four projections 4-6% faster at 32 and 64 rows and slower
at 16 and 128 (bench/linear_bench.py, rows in bench/results/linears.jsonl). The arch's config
(``lt_rows`` in hip_kernels/configs/<arch>/vendor_blas.json: inclusive [low, high] token
ranges) names where cuBLASLt was measured faster; the model's forward runs inside
``prefer_lt(rows)``. A decode graph is captured with the choice its batch bucket gets, and
replays it.

torch's preference is process-wide, so it is set around one forward and restored after it;
the engine runs one forward at a time per process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from hip_kernels.launch_config import load_config

KERNEL = "vendor_blas"


def lt_rows(arch: str | None = None) -> tuple[tuple[int, int], ...]:
    """The arch's token ranges that prefer cuBLASLt / hipBLASLt (empty: never)."""
    ranges = load_config(KERNEL, arch)["lt_rows"]
    if not isinstance(ranges, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r)
            and 0 < r[0] <= r[1] for r in ranges):
        raise ValueError(f"vendor_blas: lt_rows must be a list of [low, high] token ranges "
                         f"with 0 < low <= high, got {ranges!r}")
    return tuple((int(lo), int(hi)) for lo, hi in ranges)


@contextlib.contextmanager
def prefer_lt(rows: int, ranges: tuple[tuple[int, int], ...]) -> Iterator[None]:
    """Prefer the Lt library inside the block when ``rows`` falls in one of ``ranges``."""
    if not any(lo <= rows <= hi for lo, hi in ranges):
        yield
        return
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)
