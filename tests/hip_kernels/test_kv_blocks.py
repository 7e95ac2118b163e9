"""gather_kv_blocks / scatter_kv_blocks against their references: interpreter, and GPU."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    DTYPES,
    Case,
    CaseResult,
    compare,
    reference_tests,
    run_cases_main,
)

from hip_kernels.kv_blocks import (
    chunk_table,
    copy_segments,
    copy_segments_ref,
    gather_kv_blocks,
    gather_kv_blocks_ref,
    scatter_kv_blocks,
    scatter_kv_blocks_ref,
)

# Block tails [layers, 2, block_size, kv_heads, head_dim]: odd sizes, and one block
# (2 x 2 x 16 x 2 x 64 = 8192 elements) that takes two programs of the default chunk.
TAILS = ((1, 2, 1, 1, 8), (3, 2, 5, 3, 18), (2, 2, 16, 2, 64))
CASES = [
    Case(name, dtype, {"tail": tail, "num_ids": 3})
    for name in ("gather_kv_blocks", "scatter_kv_blocks")
    for dtype in ("fp32", "fp16", "bf16")
    for tail in TAILS
] + [
    # staging in another dtype than the cache: both directions cast.
    Case("gather_kv_blocks", "bf16", {"tail": (2, 2, 4, 2, 16), "num_ids": 5, "staging": "fp32"}),
    Case("scatter_kv_blocks", "bf16", {"tail": (2, 2, 4, 2, 16), "num_ids": 5,
                                       "staging": "fp32"}),
    # a per-layer view of the cache is not flat per block: the launcher takes the reference.
    Case("gather_kv_blocks", "fp16", {"tail": (3, 2, 4, 2, 16), "num_ids": 4, "layer_view": 1}),
    Case("scatter_kv_blocks", "fp16", {"tail": (3, 2, 4, 2, 16), "num_ids": 4,
                                       "layer_view": 1}),
]
# copy_segments: byte runs (src, dst, length); 64-byte aligned ones take the kernel (one run
# longer than a program's chunk is cut in two), the unaligned case takes the reference.
COPY_RUNS = {
    "aligned": ((0, 4096, 64 * 40), (8192, 0, 64), (64 * 300, 64 * 520, 64 * 2049),
                (64 * 2500, 64 * 100, 64 * 7)),
    "unaligned": ((3, 100, 77), (500, 0, 64)),
}
CASES += [Case("copy_segments", "fp32", {"runs": name}) for name in COPY_RUNS]
GPU_CASES = [Case(name, "bf16", {"tail": (32, 2, 16, 8, 128), "num_ids": 64})
             for name in ("gather_kv_blocks", "scatter_kv_blocks")]
GPU_CASES += [Case("copy_segments", "fp32", {"runs": "aligned"})]


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Distinct random block ids; the whole destination must equal the reference's."""
    p = case.params
    if case.name == "copy_segments":
        return _run_copy_case(case, device)
    num_blocks = p["num_ids"] * 2 + 1
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(num_blocks, *p["tail"], generator=gen).to(case.torch_dtype).to(device)
    if p.get("layer_view"):
        cache = cache[:, 1]
    staging_dtype = DTYPES[p.get("staging", case.dtype)]
    staging = torch.randn(p["num_ids"], *cache.shape[1:], generator=gen)
    staging = staging.to(staging_dtype).to(device)
    block_ids = torch.randperm(num_blocks, generator=gen)[:p["num_ids"]].to(torch.int32)
    block_ids = block_ids.to(device)
    # Same dtype: a pure copy, bit-exact. Casting fp32 -> bf16 rounds; Triton 3.9's interpreter
    # truncates there, so that case gets bf16's tolerance instead.
    exact = staging_dtype == case.torch_dtype
    if case.name == "gather_kv_blocks":
        expected = staging.clone()
        gather_kv_blocks(cache, block_ids, staging)
        gather_kv_blocks_ref(cache, block_ids, expected)
        return compare(case.id, staging, expected, case.torch_dtype, exact=exact)
    expected = cache.clone()
    scatter_kv_blocks(staging, block_ids, cache)
    scatter_kv_blocks_ref(staging, block_ids, expected)
    return compare(case.id, cache, expected, case.torch_dtype, exact=exact)


def _run_copy_case(case: Case, device: str) -> CaseResult:
    """copy_segments into a random destination equals the per-run reference, byte for byte."""
    runs = COPY_RUNS[case.params["runs"]]
    gen = torch.Generator().manual_seed(1)
    size = 64 * 4800
    src = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen).to(device)
    dst = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen).to(device)
    expected = dst.clone()
    copy_segments(src, dst, runs)
    copy_segments_ref(src, expected, runs)
    return compare(case.id, dst, expected, torch.uint8, exact=True)


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_staging_of_the_wrong_shape_is_a_clear_error():
    cache, staging = torch.zeros(4, 2, 8), torch.zeros(2, 2, 4)
    with pytest.raises(ValueError, match="is not 2 blocks"):
        gather_kv_blocks(cache, torch.tensor([0, 1]), staging)


def test_chunk_table_cuts_runs_into_word_chunks():
    table = chunk_table([(0, 64, 64 * 3), (640, 0, 64)], word_bytes=4, chunk_words=16)
    assert table.tolist() == [[0, 16, 32, 160], [16, 32, 48, 0], [16, 16, 16, 16]]
    assert chunk_table([], 4, 16).shape == (3, 0)


def test_copy_run_outside_a_region_is_a_clear_error():
    src, dst = torch.zeros(128, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside"):
        copy_segments(src, dst, [(0, 0, 128)])
    with pytest.raises(ValueError, match="flat uint8"):
        copy_segments(src.view(torch.int32), dst, [(0, 0, 4)])



if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
