"""paged_mla_decode against its reference: interpreter on CPU (direct and split), GPU at
DeepSeek shapes; and the reference itself against a naive loop in fp64."""

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

from hip_kernels.paged_kv import PagedKV, make_paged_kv
from hip_kernels.paged_mla_decode import (
    MlaDecodePlan,
    _launch_mla_decode,
    latent_chunks,
    mla_decode_plan,
    paged_mla_decode,
    paged_mla_decode_ref,
)

# dim = latent D (40: even halves of 20; 41: halves of 21, the V half's last element is
# padding); rank = kv_lora_rank. Rank 38 at D 40 puts output columns in the V half's TAIL chunk.
CASES = [
    Case("mla", dtype, {"seq_lens": lens, "heads": heads, "dim": dim, "rank": rank,
                        "block_size": bs})
    for dtype in ("fp32", "fp16", "bf16")
    for lens, heads, dim, rank, bs in (((1, 17, 70), 3, 40, 32, 8),
                                       ((33, 5), 16, 41, 33, 16))
] + [
    Case("mla", "fp32", {"seq_lens": (9, 64), "heads": 1, "dim": 41, "rank": 33,
                         "block_size": 8}),
    # split along the sequence, merged by the reduce kernel; short sequences leave splits empty.
    Case("mla", "fp32", {"seq_lens": (70, 3, 41), "heads": 16, "dim": 40, "rank": 38,
                         "block_size": 16, "split_tokens": 16}),
    Case("mla", "bf16", {"seq_lens": (70, 1, 41), "heads": 3, "dim": 41, "rank": 33,
                         "block_size": 8, "split_tokens": 32}),
    Case("mla", "fp16", {"seq_lens": (45,), "heads": 1, "dim": 40, "rank": 32,
                         "block_size": 16, "split_tokens": 16}),
    # 20 heads: two head blocks of 16, the second mostly masked.
    Case("mla", "fp32", {"seq_lens": (50, 7), "heads": 20, "dim": 41, "rank": 33,
                         "block_size": 8, "split_tokens": 32}),
]
# DeepSeek-V2/V3: latent 576 = kv_lora_rank 512 + rope 64; 16 heads (V2-Lite, V3 at TP 8)
# and 128 (V3); softmax scale 1 / sqrt(192).
GPU_CASES = [
    Case("mla", "bf16", {"seq_lens": lens, "heads": heads, "dim": 576, "rank": 512,
                         "block_size": 16})
    for lens, heads in (((8192, 1, 1000, 4095), 16), ((1024,) * 64, 16), ((8192,), 16),
                        ((4096, 4096, 1, 777), 128), ((8192,), 128), ((2048,) * 16, 128))
] + [Case("mla", "fp32", {"seq_lens": (3000, 5, 777), "heads": 16, "dim": 576, "rank": 512,
                          "block_size": 16, "split_tokens": 512})]


def make_latent_cache(seq_lens: list[int], latent_dim: int, block_size: int,
                      dtype: torch.dtype, device: str = "cpu") -> PagedKV:
    """A [blocks, 2 layers, 2, bs, 1, half] cache viewed at layer 1; layer 0 and the padding
    element of an odd latent are NaN, so reading either shows in the output."""
    half = -(-latent_dim // 2)
    kv = make_paged_kv(seq_lens, 1, half, block_size, dtype, device)
    kv.kv_cache[:, 0] = float("nan")
    if latent_dim % 2:
        kv.kv_cache[:, :, 1, :, :, half - 1] = float("nan")
    return kv


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Scattered paged latents, one query per sequence and head; kernel vs reference."""
    p = case.params
    kv = make_latent_cache(list(p["seq_lens"]), p["dim"], p["block_size"], case.torch_dtype,
                           device)
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(len(p["seq_lens"]), p["heads"], p["dim"], generator=gen, device=device)
    q = q.to(case.torch_dtype)
    scale = 1 / math.sqrt(192 if p["dim"] == 576 else p["dim"])
    args = (q, kv.kv_layer, kv.block_tables, kv.seq_lens, scale, p["rank"])
    if "split_tokens" in p:
        max_len = kv.block_tables.shape[1] * p["block_size"]
        plan = MlaDecodePlan(block_h=16, block_n=16, num_warps=4, num_stages=1,
                             reduce_num_warps=1, split_tokens=p["split_tokens"],
                             num_splits=-(-max_len // p["split_tokens"]))
        out = _launch_mla_decode(*args, plan)
    else:
        out = paged_mla_decode(*args)
    return compare(case.id, out, paged_mla_decode_ref(*args), case.torch_dtype)


def naive_mla_decode(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, kv_lora_rank: int) -> torch.Tensor:
    """Element by element, in Python floats: the definition the reference must match."""
    bsz, num_heads, latent_dim = q.shape
    block_size, half = kv_layer.shape[2], kv_layer.shape[4]
    out = torch.zeros(bsz, num_heads, kv_lora_rank, dtype=torch.float64)
    for i in range(bsz):
        latents = [[float(kv_layer[int(block_tables[i, t // block_size]), j // half,
                                   t % block_size, 0, j % half]) for j in range(latent_dim)]
                   for t in range(int(seq_lens[i]))]
        for h in range(num_heads):
            scores = [scale * sum(float(q[i, h, j]) * row[j] for j in range(latent_dim))
                      for row in latents]
            weights = [math.exp(s - max(scores)) for s in scores]
            for r in range(kv_lora_rank):
                out[i, h, r] = sum(w * row[r] for w, row in zip(weights, latents, strict=True))
            out[i, h] /= sum(weights)
    return out


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


@pytest.mark.parametrize("latent_dim", [9, 10])
def test_reference_matches_a_naive_loop_in_fp64(latent_dim: int):
    kv = make_latent_cache([1, 5, 11], latent_dim, 4, torch.float64)
    q = torch.randn(3, 3, latent_dim, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    args = (q, kv.kv_layer, kv.block_tables, kv.seq_lens, 0.4, latent_dim - 3)
    out = paged_mla_decode_ref(*args)
    assert out.dtype == torch.float64 and out.shape == (3, 3, latent_dim - 3)
    torch.testing.assert_close(out, naive_mla_decode(*args), atol=1e-12, rtol=1e-12)


def test_launcher_signature_matches_reference():
    assert same_signature(paged_mla_decode, paged_mla_decode_ref)


def test_latent_halves_split_into_power_of_two_chunks():
    assert latent_chunks(288) == (256, 32)  # DeepSeek: 576 = 2 x 288
    assert latent_chunks(20) == (16, 16)
    assert latent_chunks(256) == (256, 16)  # the TAIL is wholly masked
    assert latent_chunks(5) == (16, 16)


def test_plan_splits_long_contexts_at_batch_1():
    plan = mla_decode_plan(batch_size=1, num_heads=16, max_context_tokens=8192, arch="sm_90")
    assert plan.num_splits > 1
    assert plan.split_tokens % plan.block_n == 0
    assert plan.split_tokens * plan.num_splits >= 8192 > plan.split_tokens * (plan.num_splits - 1)


def test_plan_does_not_split_when_the_batch_fills_the_device():
    plan = mla_decode_plan(batch_size=512, num_heads=16, max_context_tokens=4096, arch="gfx942")
    assert plan.num_splits == 1


@pytest.mark.parametrize("arch", ["default", "sm_90", "gfx942", "gfx950"])
def test_plan_fills_at_most_one_wave_and_keeps_the_minimum_split(arch: str):
    from hip_kernels.launch_config import get_int, load_config

    cfg = load_config("paged_mla_decode", arch)
    wave = get_int(cfg, "num_compute_units") * get_int(cfg, "programs_per_cu")
    for heads, context in ((16, 8192), (128, 8192), (128, 300), (3, 65536)):
        plan = mla_decode_plan(batch_size=1, num_heads=heads, max_context_tokens=context,
                               arch=arch)
        head_blocks = -(-heads // plan.block_h)
        assert plan.block_h >= 16
        assert plan.num_splits == 1 or head_blocks * plan.num_splits <= wave
        assert plan.num_splits <= -(-context // get_int(cfg, "min_split_tokens"))


@pytest.mark.parametrize(("q_shape", "kv_shape", "rank", "match"), [
    ((1, 4, 40), (4, 2, 8, 2, 20), 32, "num_blocks, 2, block_size, 1, 20"),
    ((1, 4, 41), (4, 2, 8, 1, 20), 33, "num_blocks, 2, block_size, 1, 21"),
    ((1, 4, 40), (4, 2, 8, 1, 20), 41, "kv_lora_rank 41"),
    ((4, 40), (4, 2, 8, 1, 20), 32, "batch, heads, latent_dim"),
])
def test_bad_shapes_are_clear_errors(q_shape, kv_shape, rank, match):
    kv_layer = torch.zeros(kv_shape)
    with pytest.raises(ValueError, match=re.escape(match)):
        paged_mla_decode(torch.zeros(q_shape), kv_layer, torch.zeros(1, 1, dtype=torch.int32),
                         torch.ones(1, dtype=torch.int32), 1.0, rank)



if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
