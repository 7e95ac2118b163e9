"""mla_prefill_attention against its reference: interpreter on CPU (odd dims, chunks after a
prefix, strided views of fused projections), GPU at DeepSeek shapes; the reference against a
naive loop in fp64."""

from __future__ import annotations

import math
import re

import pytest
import torch
from kernel_testing import (
    Case,
    CaseResult,
    compare,
    reference_tests,
    run_cases_main,
    same_signature,
)

from hip_kernels.mla_prefill_attention import mla_prefill_attention, mla_prefill_attention_ref

# (query chunk, keys) per sequence: a fresh prompt has chunk == keys; a chunk after a cached
# prefix has fewer queries than keys; (0, 5) is a sequence with nothing to compute this step.
CASES = [
    Case("mla_prefill", dtype, {"seqs": seqs, "heads": heads, "nope": nope, "rope": rope,
                                "v": v})
    for dtype in ("fp32", "fp16", "bf16")
    for seqs, heads, nope, rope, v in (
        (((5, 5), (17, 40), (1, 9)), 3, 16, 8, 16),
        (((70, 70), (0, 5), (3, 80)), 2, 24, 12, 20))  # dims not powers of two
]
GPU_CASES = [
    Case("mla_prefill", "bf16", {"seqs": seqs, "heads": heads, "nope": 128, "rope": 64,
                                 "v": 128})
    for seqs, heads in ((((4096, 4096),), 16), (((512, 8192), (2048, 2048), (1, 3000)), 16),
                        (((1024, 1024),) * 4, 128))
]


def make_inputs(case: Case, device: str = "cpu") -> tuple[torch.Tensor, ...]:  # 7 tensors
    """Views of fused projections as the model makes them: q [T, H, nope + rope] split, the
    kv_b output [S, H, nope + v] split, k_pe a slice of a wider row."""
    p, dt = case.params, case.torch_dtype
    gen = torch.Generator(device=device).manual_seed(3)
    q_lens = [q for q, _ in p["seqs"]]
    kv_lens = [k for _, k in p["seqs"]]
    t, s, h = sum(q_lens), sum(kv_lens), p["heads"]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dt)

    q = rand(t, h, p["nope"] + p["rope"])
    kv = rand(s, h, p["nope"] + p["v"])
    wide = rand(s, 40 + p["rope"])
    q_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                         device=device)
    kv_loc = torch.tensor([0, *torch.tensor(kv_lens).cumsum(0).tolist()], dtype=torch.int32,
                          device=device)
    return (q[..., :p["nope"]], q[..., p["nope"]:], kv[..., :p["nope"]], wide[:, 40:],
            kv[..., p["nope"]:], q_loc, kv_loc)


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    q_n, q_p, k_n, k_p, v, q_loc, kv_loc = make_inputs(case, device)
    args = (q_n, q_p, k_n, k_p, v, q_loc, kv_loc,
            1 / math.sqrt(case.params["nope"] + case.params["rope"]))
    return compare(case.id, mla_prefill_attention(*args), mla_prefill_attention_ref(*args),
                   case.torch_dtype)


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_reference_matches_a_naive_loop_in_fp64():
    case = Case("mla_prefill", "fp32", {"seqs": ((2, 2), (3, 6)), "heads": 2, "nope": 3,
                                        "rope": 2, "v": 4})
    q_n, q_p, k_n, k_p, v, q_loc, kv_loc = (x.double() if x.is_floating_point() else x
                                            for x in make_inputs(case))
    out = mla_prefill_attention_ref(q_n, q_p, k_n, k_p, v, q_loc, kv_loc, 0.3)
    assert out.dtype == torch.float64
    for (q_lo, q_hi), (k_lo, k_hi) in (((0, 2), (0, 2)), ((2, 5), (2, 8))):
        for t in range(q_lo, q_hi):
            visible = range(k_lo, k_hi - (q_hi - 1 - t))  # the chunk is the last positions
            for h in range(2):
                scores = [0.3 * (float(q_n[t, h] @ k_n[j, h]) + float(q_p[t, h] @ k_p[j]))
                          for j in visible]
                w = [math.exp(x - max(scores)) for x in scores]
                want = sum(wi * v[j, h] for wi, j in zip(w, visible, strict=True)) / sum(w)
                torch.testing.assert_close(out[t, h], want, atol=1e-12, rtol=1e-12)


def test_launcher_signature_matches_reference():
    assert same_signature(mla_prefill_attention, mla_prefill_attention_ref)


def test_bad_shapes_are_clear_errors():
    z = torch.zeros
    with pytest.raises(ValueError, match=re.escape("[T,H,N], [T,H,R], [S,H,N], [S,R], [S,H,V]")):
        mla_prefill_attention(z(4, 2, 8), z(4, 2, 4), z(6, 2, 8), z(6, 5), z(6, 2, 8),
                              z(2, dtype=torch.int32), z(2, dtype=torch.int32), 1.0)



if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
