"""reshape_and_cache against reshape_and_cache_ref: interpreter on CPU, and GPU."""

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

from hip_kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref

NUM_LAYERS = 3
LAYER = 1
CASES = [
    Case("reshape_and_cache", dtype, {"tokens": tokens, "kv_heads": heads, "dim": dim,
                                      "block_size": block_size})
    for dtype in ("fp32", "fp16", "bf16")
    for tokens, heads, dim, block_size in ((1, 1, 64, 16), (7, 3, 18, 5), (33, 2, 128, 16))
] + [
    # key/value as strided slices of a fused qkv projection.
    Case("reshape_and_cache", "bf16", {"tokens": 9, "kv_heads": 2, "dim": 32, "block_size": 4,
                                       "fused": 1}),
    # fp16 inputs written into an fp32 cache (exact cast).
    Case("reshape_and_cache", "fp32", {"tokens": 6, "kv_heads": 2, "dim": 16, "block_size": 8,
                                       "input": "fp16"}),
    # padded tokens carry slot -1: the kernel skips them.
    Case("reshape_and_cache", "fp16", {"tokens": 10, "kv_heads": 2, "dim": 16, "block_size": 8,
                                       "padding": 3}),
]
GPU_CASES = [Case("reshape_and_cache", dtype, {"tokens": 8192, "kv_heads": 8, "dim": 128,
                                               "block_size": 16, "fused": 1})
             for dtype in ("fp32", "bf16")]


def _key_value(case: Case, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """key, value [T, Hk, D], separate or as views of one qkv tensor."""
    gen = torch.Generator().manual_seed(0)
    p = case.params
    dtype = DTYPES[p.get("input", case.dtype)]
    tokens, heads, dim = p["tokens"], p["kv_heads"], p["dim"]
    if not p.get("fused"):
        kv = torch.randn(2, tokens, heads, dim, generator=gen).to(dtype).to(device)
        return kv[0], kv[1]
    qkv = torch.randn(tokens, 4 * heads * dim, generator=gen).to(dtype).to(device)
    key = qkv[:, 2 * heads * dim:3 * heads * dim].view(tokens, heads, dim)
    return key, qkv[:, 3 * heads * dim:].view(tokens, heads, dim)


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Write into layer LAYER of a whole cache; the entire cache must equal the reference's."""
    p = case.params
    key, value = _key_value(case, device)
    num_blocks = p["tokens"] // p["block_size"] + 3
    shape = (num_blocks, NUM_LAYERS, 2, p["block_size"], p["kv_heads"], p["dim"])
    cache = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    cache = cache.to(case.torch_dtype).to(device)
    ref_cache = cache.clone()
    gen = torch.Generator().manual_seed(1)
    slots = torch.randperm(num_blocks * p["block_size"], generator=gen)[:p["tokens"]].to(device)
    slots[:p.get("padding", 0)] = -1
    reshape_and_cache(key, value, cache[:, LAYER], slots)
    keep = slots >= 0
    reshape_and_cache_ref(key[keep], value[keep], ref_cache[:, LAYER], slots[keep])
    return compare(case.id, cache, ref_cache, case.torch_dtype, exact=True)


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_mismatched_shapes_are_a_clear_error():
    key = torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match="disagree"):
        reshape_and_cache(key, key, torch.zeros(4, 2, 4, 3, 8), torch.zeros(2, dtype=torch.long))



if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
