"""skinny_gemm against skinny_gemm_ref (interpreter on CPU, and GPU); the routing of a plain
linear to it (disagg/models/parallel.py) where the arch's config allows."""

from __future__ import annotations

import json
import os

import pytest
import torch
from kernel_testing import Case, CaseResult, compare, reference_tests, run_cases_main

from hip_kernels.launch_config import KNOWN_ARCHS, OVERRIDE_ENV, overridden
from hip_kernels.skinny_gemm import (
    MAX_ROWS,
    max_rows,
    skinny_gemm,
    skinny_gemm_ref,
    skinny_plan,
)

# (M, N, K): N tails inside a column block, K tails inside a K tile, K shorter than one tile;
# M = 1 takes the one-row accumulator, 2..8 the per-tile reduction (3 and 5: masked rows)
SHAPES = ((1, 33, 300), (1, 16, 40), (2, 40, 129), (3, 17, 64), (5, 70, 200), (8, 24, 96))
CASES = [Case("skinny_gemm", dtype, {"shape": shape, "bias": bias})
         for dtype in ("fp32", "fp16", "bf16")
         for shape, bias in zip(SHAPES, (False, True, False, True, False, True))] + [
    Case("skinny_gemm", "bf16", {"shape": (4, 48, 80), "bias": False, "x": "strided"})] + [
    # outputs wider than wide_n take the *_wide tiles (made small here so the interpreter can)
    Case("skinny_gemm", "fp32", {"shape": (m, 70, 96), "bias": m == 3, "wide": True})
    for m in (1, 3)]
WIDE = {"skinny_gemm": {"wide_n": 32, "block_n_wide": [[8, 32]], "block_k_wide": [[8, 32]],
                        "num_warps_wide": [[8, 2]]}}
GPU_CASES = [Case("skinny_gemm", "bf16", {"shape": (m, n, k), "bias": False})
             for m in (1, 2, 8) for n, k in ((6144, 4096), (4096, 4096), (4096, 14336))]


def make_inputs(case: Case, device: str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    m, n, k = case.params["shape"]
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    dtype = case.torch_dtype
    if case.params.get("x") == "strided":  # rows of a wider tensor: stride_xm != K
        x = torch.randn(m, 2 * k, generator=gen)[:, :k]
    else:
        x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) if case.params["bias"] else None
    move = lambda t: t.to(dtype).to(device)  # noqa: E731
    return move(x), move(w), None if b is None else move(b)


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    x, w, b = make_inputs(case, device)
    with overridden(WIDE if case.params.get("wide") else {}):
        y = skinny_gemm(x, w, b)
    return compare(case.id, y, skinny_gemm_ref(x, w, b), case.torch_dtype)


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_the_reference_is_the_linear_in_fp32():
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 20, generator=gen), torch.randn(7, 20, generator=gen), \
        torch.randn(7, generator=gen)
    assert torch.allclose(skinny_gemm_ref(x, w, b), x @ w.T + b, atol=1e-5)
    xb = x.bfloat16()
    assert skinny_gemm_ref(xb, w.bfloat16()).dtype is torch.bfloat16


@pytest.mark.parametrize("arch", ("default", *KNOWN_ARCHS))
def test_every_arch_has_a_plan_for_every_row_count(arch):
    assert 0 <= max_rows(arch) <= MAX_ROWS
    for rows in range(1, MAX_ROWS + 1):
        plan = skinny_plan(rows, arch)
        assert plan.block_m >= rows and plan.block_m & (plan.block_m - 1) == 0
        assert plan.block_n & (plan.block_n - 1) == 0 and plan.block_k % 16 == 0


def test_wider_outputs_take_the_wide_tiles(monkeypatch):
    monkeypatch.setenv(OVERRIDE_ENV, json.dumps(WIDE))
    narrow, wide = skinny_plan(1, "default", 32), skinny_plan(1, "default", 33)
    assert (wide.block_n, wide.block_k, wide.num_warps) == (32, 32, 2)
    assert (narrow.block_n, narrow.block_k) != (wide.block_n, wide.block_k)


def test_the_portable_config_keeps_the_vendor_blas(monkeypatch):
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    assert max_rows("default") == 0
    monkeypatch.setenv(OVERRIDE_ENV, json.dumps({"skinny_gemm": {"max_rows": 99}}))
    assert max_rows("default") == MAX_ROWS  # never past what the kernel is built for


def test_shapes_it_cannot_take_are_clear_errors():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.importorskip("triton")
    w = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="rows"):
        skinny_gemm(torch.zeros(MAX_ROWS + 1, 8), w)
    with pytest.raises(ValueError, match="weight must be"):
        skinny_gemm(torch.zeros(1, 8), w.half())


if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
