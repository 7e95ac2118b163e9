"""rotary_embedding against rotary_embedding_ref: interpreter on CPU, and GPU."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    Case,
    CaseResult,
    combine,
    compare,
    reference_tests,
    run_cases_main,
)

from hip_kernels.rotary_embedding import (
    make_cos_sin_cache,
    rotary_embedding,
    rotary_embedding_ref,
)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CASES = [
    Case("rotary_embedding", dtype, {"tokens": tokens, "heads": heads, "dim": dim})
    for dtype in ("fp32", "fp16", "bf16")
    for tokens, heads, dim in ((1, (1, 1), 64), (7, (6, 3), 18), (5, (4, 1), 128))
] + [
    # more q heads than one loop step holds (32 heads of 64 pairs), so the head loop runs twice.
    Case("rotary_embedding", "fp32", {"tokens": 2, "heads": (40, 8), "dim": 128}),
    # q and k as strided slices of one fused qkv row, as the model produces them.
    Case("rotary_embedding", "bf16", {"tokens": 9, "heads": (4, 2), "dim": 32, "fused": 1}),
]
GPU_CASES = [Case("rotary_embedding", dtype, {"tokens": 8192, "heads": (32, 8), "dim": 128,
                                              "fused": 1}) for dtype in ("fp32", "bf16")]


def _qk(case: Case, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D] and k [T, Hk, D], either separate or views into one qkv tensor."""
    gen = torch.Generator().manual_seed(0)
    tokens, dim = case.params["tokens"], case.params["dim"]
    num_q, num_kv = case.params["heads"]
    if not case.params.get("fused"):
        q = torch.randn(tokens, num_q, dim, generator=gen)
        k = torch.randn(tokens, num_kv, dim, generator=gen)
        return q.to(case.torch_dtype).to(device), k.to(case.torch_dtype).to(device)
    qkv = torch.randn(tokens, (num_q + 2 * num_kv) * dim, generator=gen)
    qkv = qkv.to(case.torch_dtype).to(device)
    q = qkv[:, :num_q * dim].view(tokens, num_q, dim)
    k = qkv[:, num_q * dim:(num_q + num_kv) * dim].view(tokens, num_kv, dim)
    return q, k


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Random positions (with repeats) into a Llama-3-scaled cache; kernel vs reference."""
    q, k = _qk(case, device)
    cache = make_cos_sin_cache(4096, case.params["dim"], 500000.0, LLAMA3_SCALING, device)
    gen = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 4096, (case.params["tokens"],), generator=gen).to(device)
    q_out, k_out = rotary_embedding(positions, q, k, cache)
    q_ref, k_ref = rotary_embedding_ref(positions, q, k, cache)
    return combine([compare(case.id, q_out, q_ref, case.torch_dtype),
                    compare(case.id, k_out, k_ref, case.torch_dtype)])


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_mismatched_rotary_dim_is_a_clear_error():
    q, k = torch.zeros(2, 4, 64), torch.zeros(2, 1, 64)
    with pytest.raises(ValueError, match="must be equal and even"):
        rotary_embedding(torch.zeros(2, dtype=torch.long), q, k, torch.zeros(16, 32))



if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
