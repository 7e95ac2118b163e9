"""The fp8 KV cache variants of every kernel that writes or reads the cache, against their
references in the interpreter: reshape_and_cache (quantize, saturate: bit-exact), paged decode
and prefill attention and the MLA decode (dequantize with the scales: the q dtype's tolerance),
for e4m3fn and e4m3fnuz caches, scales other than 1; and the block copies' references on fp8."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import (
    Case,
    CaseResult,
    compare,
    failure_message,
    interpreter_results,
    run_cases_main,
)

from disagg.common import platform
from hip_kernels.kv_blocks import gather_kv_blocks_ref, scatter_kv_blocks_ref
from hip_kernels.kv_fp8 import dequantize_ref, quantize_ref
from hip_kernels.paged_decode_attention import (
    DecodePlan,
    _launch_decode,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from hip_kernels.paged_kv import make_paged_kv
from hip_kernels.paged_mla_decode import (
    MlaDecodePlan,
    _launch_mla_decode,
    paged_mla_decode,
    paged_mla_decode_ref,
)
from hip_kernels.paged_prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from hip_kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref

FP8 = {"fn": torch.float8_e4m3fn, "fnuz": torch.float8_e4m3fnuz}
K_SCALE, V_SCALE = 0.37, 2.5
CASES = [
    # inputs spanning 1e-4 .. 1e3 after scaling: subnormals, rounding up a binade, saturation
    Case("write", "bf16", {"kv": "fn", "tokens": 21, "heads": 3, "dim": 40, "bs": 8}),
    Case("write", "fp32", {"kv": "fnuz", "tokens": 9, "heads": 2, "dim": 16, "bs": 4}),
    Case("decode", "fp32", {"kv": "fn", "seq_lens": (1, 17, 40), "heads": (4, 2), "dim": 32,
                            "bs": 16}),
    Case("decode", "bf16", {"kv": "fnuz", "seq_lens": (33, 5), "heads": (2, 1), "dim": 18,
                            "bs": 5}),
    Case("decode", "fp32", {"kv": "fn", "seq_lens": (70, 3, 41), "heads": (4, 1), "dim": 32,
                            "bs": 16, "split_tokens": 16}),
    Case("prefill", "fp32", {"kv": "fn", "seq_lens": (9, 30), "q_lens": (9, 4),
                             "heads": (4, 2), "dim": 32, "bs": 4}),
    Case("prefill", "bf16", {"kv": "fnuz", "seq_lens": (20,), "q_lens": (7,), "heads": (2, 2),
                             "dim": 16, "bs": 8}),
    Case("mla", "fp32", {"kv": "fn", "seq_lens": (1, 17, 40), "heads": 3, "dim": 40,
                         "rank": 32, "bs": 8}),
    Case("mla", "bf16", {"kv": "fnuz", "seq_lens": (70, 3), "heads": 16, "dim": 41,
                         "rank": 33, "bs": 16, "split_tokens": 32}),
]
# Llama-3-8B and DeepSeek shapes, bf16 queries, the GPU's own fp8 format ("kv" is ignored).
GPU_CASES = [
    Case("write", "bf16", {"kv": "gpu", "tokens": 4096, "heads": 8, "dim": 128, "bs": 16}),
    Case("decode", "bf16", {"kv": "gpu", "seq_lens": (4096, 17, 1000), "heads": (32, 8),
                            "dim": 128, "bs": 16}),
    Case("prefill", "bf16", {"kv": "gpu", "seq_lens": (2048, 600), "q_lens": (2048, 100),
                             "heads": (32, 8), "dim": 128, "bs": 16}),
    Case("mla", "bf16", {"kv": "gpu", "seq_lens": (4096, 1, 777), "heads": 16, "dim": 576,
                         "rank": 512, "bs": 16}),
]


def _kv_dtype(case: Case, device: str) -> torch.dtype:
    """The case's fp8 format on CPU; on a GPU the one its hardware has (fnuz on gfx94x)."""
    return FP8[case.params["kv"]] if device == "cpu" else platform.fp8_dtype()


def _write(case: Case, device: str) -> CaseResult:
    """Quantize into layer 1 of a 3-layer fp8 cache; every byte equals the reference's."""
    p = case.params
    gen = torch.Generator().manual_seed(0)
    spread = torch.logspace(-4, 3, p["dim"])  # per-column magnitudes
    kv = (torch.randn(2, p["tokens"], p["heads"], p["dim"], generator=gen) * spread)
    key, value = kv.to(case.torch_dtype).to(device).unbind(0)
    blocks = p["tokens"] // p["bs"] + 3
    cache = torch.zeros(blocks, 3, 2, p["bs"], p["heads"], p["dim"],
                        dtype=_kv_dtype(case, device), device=device)
    ref = cache.clone()
    slots = torch.randperm(blocks * p["bs"], generator=gen)[:p["tokens"]].to(device)
    slots[0] = -1  # a padded token: the kernel skips it
    reshape_and_cache(key, value, cache[:, 1], slots, K_SCALE, V_SCALE)
    reshape_and_cache_ref(key[1:], value[1:], ref[:, 1], slots[1:], K_SCALE, V_SCALE)
    return compare(case.id, cache.view(torch.uint8), ref.view(torch.uint8), torch.float32,
                   exact=True)


def _decode(case: Case, device: str) -> CaseResult:
    p = case.params
    num_q, num_kv = p["heads"]
    kv = make_paged_kv(list(p["seq_lens"]), num_kv, p["dim"], p["bs"], _kv_dtype(case, device),
                       device)
    q = torch.randn(len(p["seq_lens"]), num_q, p["dim"],
                    generator=torch.Generator().manual_seed(1)).to(case.torch_dtype).to(device)
    args = (q, kv.kv_layer, kv.block_tables, kv.seq_lens, 1 / math.sqrt(p["dim"]))
    if "split_tokens" in p:
        plan = DecodePlan(block_n=16, num_warps=4, num_stages=1, reduce_num_warps=1,
                          split_tokens=p["split_tokens"], num_splits=-(
                              -kv.block_tables.shape[1] * p["bs"] // p["split_tokens"]))
        out = _launch_decode(*args, plan, K_SCALE, V_SCALE)
    else:
        out = paged_decode_attention(*args, K_SCALE, V_SCALE)
    return compare(case.id, out, paged_decode_attention_ref(*args, K_SCALE, V_SCALE),
                   case.torch_dtype)


def _prefill(case: Case, device: str) -> CaseResult:
    p = case.params
    num_q, num_kv = p["heads"]
    kv = make_paged_kv(list(p["seq_lens"]), num_kv, p["dim"], p["bs"], _kv_dtype(case, device),
                       device)
    starts = [0]
    for n in p["q_lens"]:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], num_q, p["dim"],
                    generator=torch.Generator().manual_seed(1)).to(case.torch_dtype).to(device)
    args = (q, kv.kv_layer, kv.block_tables,
            torch.tensor(starts, dtype=torch.int32, device=device),
            kv.seq_lens, 1 / math.sqrt(p["dim"]), K_SCALE, V_SCALE)
    return compare(case.id, paged_prefill_attention(*args), paged_prefill_attention_ref(*args),
                   case.torch_dtype)


def _mla(case: Case, device: str) -> CaseResult:
    p = case.params
    half = -(-p["dim"] // 2)
    kv = make_paged_kv(list(p["seq_lens"]), 1, half, p["bs"], _kv_dtype(case, device), device)
    q = torch.randn(len(p["seq_lens"]), p["heads"], p["dim"],
                    generator=torch.Generator().manual_seed(1)).to(case.torch_dtype).to(device)
    args = (q, kv.kv_layer, kv.block_tables, kv.seq_lens, 1 / math.sqrt(p["dim"]), p["rank"])
    if "split_tokens" in p:
        plan = MlaDecodePlan(block_h=16, block_n=16, num_warps=4, num_stages=1,
                             reduce_num_warps=1, split_tokens=p["split_tokens"], num_splits=-(
                                 -kv.block_tables.shape[1] * p["bs"] // p["split_tokens"]))
        out = _launch_mla_decode(*args, plan, K_SCALE)
    else:
        out = paged_mla_decode(*args, K_SCALE)
    return compare(case.id, out, paged_mla_decode_ref(*args, K_SCALE), case.torch_dtype)


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """One case (in the interpreter child on CPU)."""
    run = {"write": _write, "decode": _decode, "prefill": _prefill, "mla": _mla}[case.name]
    return run(case, device)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, CaseResult]:
    """All CASES run once in a TRITON_INTERPRET=1 child process."""
    return interpreter_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fp8_kernel_matches_reference_in_interpreter(case: Case,
                                                     interpreted: dict[str, CaseResult]):
    result = interpreted.get(case.id)
    assert result is not None and result.ok, failure_message(result, case.id)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_fp8_kernel_matches_reference_on_gpu(case: Case):
    result = run_case(case, "cuda")
    assert result.ok, failure_message(result, case.id)


@pytest.mark.parametrize("dtype", list(FP8.values()), ids=list(FP8))
def test_quantize_saturates_and_dequantize_applies_the_scale(dtype: torch.dtype):
    top = torch.finfo(dtype).max
    x = torch.tensor([0.0, 1.0, -3.0, 1e6, -1e6, 0.3])
    q = quantize_ref(x, 0.5, dtype)
    assert q.dtype == dtype and not torch.isnan(q.float()).any()
    assert q.float().tolist()[:5] == [0.0, 2.0, -6.0, top, -top]
    back = dequantize_ref(q, 0.5, torch.float32)
    assert torch.allclose(back[[0, 1, 2, 5]], x[[0, 1, 2, 5]], rtol=2 ** -4)
    assert back[3] == top * 0.5  # saturated, never NaN
    # a cache that is not fp8 ignores the scale
    assert torch.equal(dequantize_ref(x, 0.5, torch.float32), x)


def test_block_copies_move_fp8_bytes():
    cache = torch.randn(6, 2, 2, 4, 1, 8).to(torch.float8_e4m3fn)
    ids = torch.tensor([4, 1])
    staging = torch.empty((2, *cache.shape[1:]), dtype=cache.dtype)
    gather_kv_blocks_ref(cache, ids, staging)
    assert torch.equal(staging.view(torch.uint8), cache[ids].view(torch.uint8))
    other = torch.zeros_like(cache)
    scatter_kv_blocks_ref(staging, torch.tensor([0, 5]), other)
    assert torch.equal(other[[0, 5]].view(torch.uint8), staging.view(torch.uint8))


if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
