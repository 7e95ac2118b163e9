"""rope_and_cache against its reference (rotary_embedding_ref then reshape_and_cache_ref):
the returned q and the whole cache, bit-exact in the interpreter for fp32/fp16, else to the
dtype's tolerance (fp8 caches: within one code step). Caches in the
inputs' dtype and fp8 (both formats, scales other than 1), q/k/v as views of a fused qkv,
padded tokens (slot -1), more heads than one step covers."""

from __future__ import annotations

import os

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

from disagg.common import platform
from hip_kernels.kv_fp8 import dequantize_ref
from hip_kernels.launch_config import overridden
from hip_kernels.rope_and_cache import rope_and_cache, rope_and_cache_ref
from hip_kernels.rotary_embedding import make_cos_sin_cache

NUM_LAYERS, LAYER = 3, 1
FP8 = {"fn": torch.float8_e4m3fn, "fnuz": torch.float8_e4m3fnuz}
CASES = [
    Case("rope_and_cache", dtype, {"tokens": t, "heads": h, "dim": d, "bs": bs})
    for dtype in ("fp32", "fp16", "bf16")
    for t, h, d, bs in ((1, (4, 2), 16, 4), (7, (6, 3), 18, 5), (12, (8, 8), 32, 16))
] + [
    Case("rope_and_cache", "bf16", {"tokens": 9, "heads": (4, 2), "dim": 32, "bs": 4,
                                    "fused": 1, "padding": 3}),
    Case("rope_and_cache", "bf16", {"tokens": 5, "heads": (8, 4), "dim": 16, "bs": 8,
                                    "small_steps": 1}),
    # heads split over programs: uneven q slices, fewer K/V heads than programs, and more
    Case("rope_and_cache", "fp32", {"tokens": 4, "heads": (6, 1), "dim": 16, "bs": 4,
                                    "per_program": 4}),
    Case("rope_and_cache", "fp32", {"tokens": 3, "heads": (8, 8), "dim": 16, "bs": 4,
                                    "per_program": 2, "padding": 1}),
    Case("rope_and_cache", "fp16", {"tokens": 3, "heads": (12, 3), "dim": 32, "bs": 4,
                                    "per_program": 5, "small_steps": 1}),
    Case("rope_and_cache", "bf16", {"tokens": 11, "heads": (4, 2), "dim": 32, "bs": 4,
                                    "kv": "fn", "fused": 1, "padding": 2}),
    Case("rope_and_cache", "fp32", {"tokens": 6, "heads": (2, 1), "dim": 16, "bs": 8,
                                    "kv": "fnuz"}),
]
GPU_CASES = [Case("rope_and_cache", "bf16", {"tokens": t, "heads": (32, 8), "dim": 128,
                                             "bs": 16, "fused": 1, **kv})
             for t in (1, 64, 3000) for kv in ({}, {"kv": "gpu"})]


def _cache_dtype(case: Case, device: str) -> torch.dtype:
    kv = case.params.get("kv")
    if kv is None:
        return case.torch_dtype
    return FP8[kv] if device == "cpu" else platform.fp8_dtype()


def make_inputs(case: Case, device: str):
    p = case.params
    (hq, hk), d, t = p["heads"], p["dim"], p["tokens"]
    gen = torch.Generator().manual_seed(t * 100 + d)
    dtype = case.torch_dtype
    if p.get("fused"):  # views into one [T, (Hq + 2 Hk) D] projection, as the model has
        qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen).to(dtype).to(device)
        q = qkv[:, :hq * d].view(t, hq, d)
        k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
        v = qkv[:, (hq + hk) * d:].view(t, hk, d)
    else:
        q = torch.randn(t, hq, d, generator=gen).to(dtype).to(device)
        k = torch.randn(t, hk, d, generator=gen).to(dtype).to(device)
        v = torch.randn(t, hk, d, generator=gen).to(dtype).to(device)
    positions = torch.randint(0, 4 * t + 50, (t,), generator=gen).to(device)
    cos_sin = make_cos_sin_cache(4 * t + 50, d, 10000.0, device=device)
    blocks = t // p["bs"] + 3
    cache = torch.randn(blocks, NUM_LAYERS, 2, p["bs"], hk, d, generator=gen)
    cache = cache.to(_cache_dtype(case, device)).to(device)
    slots = torch.randperm(blocks * p["bs"], generator=gen)[:t].to(device)
    slots[:p.get("padding", 0)] = -1
    return positions, q, k, v, cos_sin, cache, slots


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    positions, q, k, v, cos_sin, cache, slots = make_inputs(case, device)
    scales = (0.5, 2.0) if case.params.get("kv") else (1.0, 1.0)
    ref_cache = cache.clone()
    override = {}
    if case.params.get("small_steps"):  # 2 heads a step: the head loop runs several times
        override["elements_per_step"] = 16
    if case.params.get("per_program"):
        override["q_heads_per_program"] = case.params["per_program"]
    with overridden({"rope_and_cache": override}):
        q_out = rope_and_cache(positions, q, k, v, cos_sin, cache[:, LAYER], slots, *scales)
    keep = slots >= 0
    q_ref_all = rope_and_cache_ref(positions, q, k, v, cos_sin, ref_cache[:, LAYER].clone(),
                                   slots.clamp_min(0), *scales)
    ref_cache_layer = ref_cache[:, LAYER]
    rope_and_cache_ref(positions[keep], q[keep], k[keep], v[keep], cos_sin, ref_cache_layer,
                       slots[keep], *scales)
    # bit-exact where rounding is exact in the interpreter; its bf16 casts may differ from
    # torch's by one unit in the last place (as rotary_embedding's do), and one bf16 unit of k
    # can move its fp8 code by one step
    exact = device == "cpu" and case.torch_dtype != torch.bfloat16
    if cache.dtype in FP8.values():
        got = dequantize_ref(cache, 1.0, torch.float32)
        want = dequantize_ref(ref_cache, 1.0, torch.float32)
        diff = (got - want).abs()
        bad = int((diff > 0.13 * want.abs() + 2.0 ** -6).sum())
        if exact:
            bad = int((diff > 0).sum())
        cache_result = CaseResult(case.id, bad == 0, float(diff.max()),
                                  f"{bad} fp8 codes off by more than one step" if bad else "")
    else:
        cache_result = compare(case.id, cache, ref_cache, case.torch_dtype, exact=exact)
    return combine([compare(case.id, q_out, q_ref_all, case.torch_dtype, exact=exact),
                    cache_result])


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_the_reference_is_rotary_then_cache_write():
    case = CASES[1]
    positions, q, k, v, cos_sin, cache, slots = make_inputs(case, "cpu")
    q_rot = rope_and_cache_ref(positions, q, k, v, cos_sin, cache[:, LAYER], slots)
    bs = case.params["bs"]
    cached_k = cache[slots // bs, LAYER, 0, slots % bs]
    cached_v = cache[slots // bs, LAYER, 1, slots % bs]
    assert torch.equal(cached_v, v)
    # a rotation keeps each pair's norm: |k| and |q| are unchanged per head
    torch.testing.assert_close(cached_k.norm(dim=-1), k.norm(dim=-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1), rtol=1e-4, atol=1e-4)
    assert not torch.equal(cached_k, k)


def test_mismatched_shapes_are_a_clear_error():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.importorskip("triton")
    q, k = torch.zeros(2, 4, 8), torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match="disagree"):
        rope_and_cache(torch.zeros(2, dtype=torch.long), q, k, torch.zeros(2, 3, 8),
                       torch.zeros(4, 8), torch.zeros(4, 2, 4, 2, 8),
                       torch.zeros(2, dtype=torch.long))


if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
