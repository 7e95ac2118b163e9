"""paged_decode_attention against its reference: interpreter on CPU (direct and split), GPU."""

from __future__ import annotations

import math

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

from hip_kernels.paged_decode_attention import (
    DecodePlan,
    _launch_decode,
    decode_plan,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from hip_kernels.paged_kv import make_paged_kv

# (q heads, kv heads): GQA groups 1, 2, 4 and a group of 3.
CASES = [
    Case("decode", dtype, {"seq_lens": lens, "heads": heads, "dim": dim, "block_size": bs})
    for dtype in ("fp32", "fp16", "bf16")
    for lens, heads, dim, bs in (((1, 17, 40), (2, 2), 64, 16),
                                 ((33, 5), (4, 2), 18, 5),
                                 ((50, 1, 31), (8, 2), 32, 16))
] + [
    Case("decode", "fp32", {"seq_lens": (9, 30), "heads": (6, 2), "dim": 16, "block_size": 4}),
    # split along the sequence (16 positions a split, tile 16), merged by the reduce kernel;
    # the shortest sequence leaves most of its splits empty.
    Case("decode", "fp32", {"seq_lens": (70, 3, 41), "heads": (4, 1), "dim": 32,
                            "block_size": 16, "split_tokens": 16}),
    Case("decode", "bf16", {"seq_lens": (70, 3, 41), "heads": (8, 2), "dim": 64,
                            "block_size": 5, "split_tokens": 32}),
    Case("decode", "fp16", {"seq_lens": (45,), "heads": (2, 2), "dim": 18, "block_size": 16,
                            "split_tokens": 16}),
]
GPU_CASES = [
    Case("decode", "bf16", {"seq_lens": lens, "heads": (32, 8), "dim": 128, "block_size": 16})
    for lens in ((4096,) * 8 + (1, 17, 1000, 4095), (130,) * 64)
] + [Case("decode", "fp32", {"seq_lens": (3000, 5, 777), "heads": (64, 8), "dim": 128,
                             "block_size": 16, "split_tokens": 512})]


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Scattered paged KV, one query per sequence; kernel (direct or forced split) vs ref."""
    p = case.params
    num_q, num_kv = p["heads"]
    kv = make_paged_kv(list(p["seq_lens"]), num_kv, p["dim"], p["block_size"],
                       case.torch_dtype, device)
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(len(p["seq_lens"]), num_q, p["dim"], generator=gen, device=device)
    q = q.to(case.torch_dtype)
    scale = 1 / math.sqrt(p["dim"])
    args = (q, kv.kv_layer, kv.block_tables, kv.seq_lens, scale)
    if "split_tokens" in p:
        max_len = kv.block_tables.shape[1] * p["block_size"]
        plan = DecodePlan(block_n=16, num_warps=4, num_stages=1, reduce_num_warps=1,
                          split_tokens=p["split_tokens"],
                          num_splits=-(-max_len // p["split_tokens"]))
        out = _launch_decode(*args, plan)
    else:
        out = paged_decode_attention(*args)
    return compare(case.id, out, paged_decode_attention_ref(*args), case.torch_dtype)


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_launcher_signature_matches_reference():
    assert same_signature(paged_decode_attention, paged_decode_attention_ref)


def test_plan_splits_long_contexts_when_the_batch_is_small():
    plan = decode_plan(batch_size=2, num_kv_heads=8, max_context_tokens=32768, arch="gfx942")
    assert plan.num_splits > 1
    assert plan.split_tokens % plan.block_n == 0
    assert plan.split_tokens * plan.num_splits >= 32768
    assert plan.split_tokens * (plan.num_splits - 1) < 32768


def test_plan_does_not_split_when_the_batch_fills_the_device():
    plan = decode_plan(batch_size=512, num_kv_heads=8, max_context_tokens=4096, arch="gfx942")
    assert plan.num_splits == 1


def test_plan_fills_at_most_one_wave_of_programs():
    # sm_90: 132 SMs x 4 resident programs = 528; 8 x 8 (seq, kv head) pairs -> 8 splits.
    plan = decode_plan(batch_size=8, num_kv_heads=8, max_context_tokens=32768, arch="sm_90")
    assert plan.num_splits == 8
    assert 8 * 8 * plan.num_splits <= 528


def test_only_long_splits_take_the_deeper_pipeline():
    # sm_90: a batch-1 step at a 4096-token table splits into 64-token pieces (one tile: 2
    # stages); batch 64 runs each (seq, kv head) whole (4096 positions: 3 stages)
    short = decode_plan(batch_size=1, num_kv_heads=8, max_context_tokens=4096, arch="sm_90")
    long = decode_plan(batch_size=64, num_kv_heads=8, max_context_tokens=4096, arch="sm_90")
    assert (short.split_tokens, short.num_stages) == (64, 2)
    assert (long.num_splits, long.num_stages) == (1, 3)
    # an arch that sets no deeper value keeps one setting everywhere
    assert decode_plan(64, 8, 4096, arch="gfx942").num_stages == \
        decode_plan(1, 8, 4096, arch="gfx942").num_stages


@pytest.mark.parametrize("arch", ["default", "sm_90", "gfx942"])
def test_plan_never_splits_below_the_minimum_split(arch: str):
    from hip_kernels.launch_config import get_int, load_config

    minimum = get_int(load_config("paged_decode_attention", arch), "min_split_tokens")
    plan = decode_plan(batch_size=1, num_kv_heads=1, max_context_tokens=300, arch=arch)
    assert 1 < plan.num_splits <= -(-300 // minimum)


def test_batch_1_on_sm_90_cuts_one_tile_per_program():
    # 1 sequence x 8 kv heads at a 4k-token table: 64 splits of one 64-token tile each.
    plan = decode_plan(batch_size=1, num_kv_heads=8, max_context_tokens=4096, arch="sm_90")
    assert plan.split_tokens == plan.block_n == 64 and plan.num_splits == 64


def test_q_heads_not_a_multiple_of_kv_heads_is_a_clear_error():
    kv = make_paged_kv([4], 3, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_decode_attention(torch.zeros(1, 4, 16), kv.kv_layer, kv.block_tables,
                               kv.seq_lens, 1.0)



if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
