"""fused_moe against fused_moe_ref (interpreter on CPU, and GPU), over both align paths and
fp8 weights (e4m3fn and e4m3fnuz, block and per-expert scales); the reference against a
per-token loop and a hand-written dequantization. The align step itself: test_moe_align.py."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    Case,
    CaseResult,
    compare,
    failure_message,
    reference_tests,
    run_cases_main,
    same_signature,
)
from test_moe_align import make_routing

from hip_kernels.fused_moe import (
    COMBINE_ELEMENTS,
    _combine_constexprs,
    fused_moe,
    fused_moe_ref,
    moe_plan,
)
from hip_kernels.launch_config import KNOWN_ARCHS, get_int, load_config, overridden
from hip_kernels.triton_compat import next_power_of_2

# shape = (T, H, I, E, K). Rows per expert cdiv(T * K, E) of 1, 2, 13, 22 and 70 reach every
# block_m bucket of the default config; T = 0 is the empty batch.
SHAPES = ((1, 48, 40, 3, 1), (7, 72, 88, 8, 2), (33, 48, 88, 8, 3), (33, 72, 40, 3, 2),
          (70, 48, 40, 3, 3))
CASES = [
    Case("fused_moe", dtype, {"shape": shape, "ids": ids, "masked": masked})
    for dtype in ("fp32", "fp16", "bf16")
    for shape, ids, masked in zip(SHAPES, ("int64", "int32") * 3, (False, True) * 3)
] + [Case("fused_moe", "bf16", {"shape": (0, 48, 40, 3, 2), "ids": "int32", "masked": False}),
     Case("fused_moe", "fp32", {"shape": (33, 48, 88, 8, 3), "ids": "int32", "masked": True}),
     # the torch align path (past align_max_pairs), forced by a config override
     Case("fused_moe", "bf16", {"shape": (9, 40, 24, 5, 3), "ids": "int64", "masked": True,
                                "align": "torch"}),
     # a token may pick one expert twice; ids and weights are strided views
     Case("fused_moe", "fp32", {"shape": (6, 24, 16, 4, 4), "ids": "int32", "masked": True,
                                "routing": "repeats,strided"})]
# fp8 weights: (shape, format, scale layout). I = 128 where w13 has 128-row blocks; H = 200,
# 260 and 264 put K tails inside a 128-column block; 70 rows per expert run BLOCK_K 64 (two
# K tiles per scale block). Layouts: block [E, ceil(N/128), ceil(K/128)], expert [E, 1, 1],
# kblock [E, 1, ceil(K/128)], nblock [E, ceil(N/128), 1].
FP8_SHAPES = (((7, 200, 128, 4, 2), "fn", "block"), ((5, 72, 40, 3, 2), "fnuz", "expert"),
              ((33, 136, 128, 5, 3), "fnuz", "block"), ((9, 260, 40, 3, 3), "fn", "kblock"),
              ((13, 48, 128, 2, 2), "fnuz", "nblock"), ((70, 264, 128, 3, 3), "fn", "block"),
              ((3, 40, 24, 4, 2), "fn", "expert"))
CASES += [
    Case("fused_moe", dtype, {"shape": shape, "ids": "int32", "masked": True, "fp8": fp8,
                              "scales": scales})
    for dtype, (shape, fp8, scales) in zip(("bf16", "fp16", "fp32", "bf16", "fp16", "bf16",
                                            "fp32"), FP8_SHAPES)
]
QWEN3_30B_A3B = (2048, 768, 128, 8)  # H, I, E, K
MIXTRAL_8X7B = (4096, 14336, 8, 2)
DEEPSEEK_V3_EP4 = (7168, 2048, 64, 8)  # the 64 of 256 experts one of 4 EP ranks holds
GPU_CASES = [
    Case("fused_moe", "bf16", {"shape": (tokens, *model), "ids": "int64", "masked": masked})
    for tokens, model, masked in ((1, QWEN3_30B_A3B, False), (64, QWEN3_30B_A3B, False),
                                  (1000, QWEN3_30B_A3B, True), (4096, QWEN3_30B_A3B, False),
                                  (64, MIXTRAL_8X7B, False), (777, MIXTRAL_8X7B, True))
] + [
    Case("fused_moe", "bf16", {"shape": (tokens, *model), "ids": "int64", "masked": masked,
                               "fp8": "native", "scales": scales})
    for tokens, model, masked, scales in (
        (1, DEEPSEEK_V3_EP4, False, "block"), (64, DEEPSEEK_V3_EP4, True, "block"),
        (1000, QWEN3_30B_A3B, False, "block"), (4096, QWEN3_30B_A3B, True, "expert"),
        (64, MIXTRAL_8X7B, False, "expert"))
]
FP8 = {"fn": torch.float8_e4m3fn, "fnuz": torch.float8_e4m3fnuz}


def fp8_scale_shape(layout: str, experts: int, n: int, k: int) -> tuple[int, int, int]:
    """The [E, Sn, Sk] scale of an [E, N, K] fp8 weight in a named layout."""
    blocks = lambda size, blocked: -(-size // 128) if blocked else 1
    return (experts, blocks(n, layout in ("block", "nblock")),
            blocks(k, layout in ("block", "kblock")))


def fp8_weight(gen: torch.Generator, shape: tuple[int, int, int], case: Case,
               device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 values over the format's range and positive scales of about 1 / (40 sqrt(K)), so
    that the dequantized weight is ~ N(0, 1 / K) (activations stay O(1))."""
    name = case.params["fp8"]
    dtype = platform_fp8() if name == "native" else FP8[name]
    values = torch.randn(*shape, generator=gen, device=device).mul_(40).clamp_(-200, 200)
    scale_shape = fp8_scale_shape(case.params["scales"], *shape)
    scale = (0.5 + torch.rand(scale_shape, generator=gen, device=device)) / (40 * shape[2]**0.5)
    return values.to(dtype), scale


def platform_fp8() -> torch.dtype:
    """The GPU's fp8 weight format (e4m3fnuz on gfx942)."""
    from disagg.common.platform import fp8_dtype

    return fp8_dtype()


def make_inputs(case: Case, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """x, w13, w2 scaled so every activation is O(1); routing per ``make_routing`` (distinct
    experts, masked when the case says so); softmax weights, strided like the ids. fp8 cases
    add w13_scale and w2_scale (``fp8_weight``)."""
    tokens, hidden, inter, experts, top_k = case.params["shape"]
    gen = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, device=device)
                                       * scale).to(case.torch_dtype)
    x = randn(tokens, hidden)
    if "fp8" in case.params:
        w13, w13_scale = fp8_weight(gen, (experts, 2 * inter, hidden), case, device)
        w2, w2_scale = fp8_weight(gen, (experts, hidden, inter), case, device)
    else:
        w13 = randn(experts, 2 * inter, hidden, scale=hidden**-0.5)
        w2 = randn(experts, hidden, inter, scale=inter**-0.5)
    routing = case.params.get("routing", "distinct") + (",masked" if case.params["masked"]
                                                        else "")
    ids_dtype = torch.int32 if case.params["ids"] == "int32" else torch.int64
    ids = make_routing(tokens, top_k, experts, routing, gen, device, ids_dtype)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen, device=device), dim=1)
    if "strided" in routing:
        weights = torch.stack([weights, torch.zeros_like(weights)], dim=2).flatten(1)[:, ::2]
    if "fp8" in case.params:
        return x, w13, w2, weights, ids, w13_scale, w2_scale
    return x, w13, w2, weights, ids


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Random routing at the case's shape; kernel vs reference (torch align if asked)."""
    args = make_inputs(case, device)
    if case.params.get("align") != "torch":
        return compare(case.id, fused_moe(*args), fused_moe_ref(*args), case.torch_dtype)
    with overridden({"fused_moe": {"align_max_pairs": 0}}):
        if moe_plan(args[4].numel(), args[1].shape[0]).triton_align:
            return CaseResult(case.id, False, float("inf"), "the override did not apply")
        out = fused_moe(*args)
    return compare(case.id, out, fused_moe_ref(*args), case.torch_dtype)


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def naive_moe(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """One token and one k at a time, straight from the definition."""
    num_experts, inter_size = w13.shape[0], w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if 0 <= e < num_experts:
                gate, up = w13[e, :inter_size] @ x[t], w13[e, inter_size:] @ x[t]
                out[t] += topk_weights[t, k] * (w2[e] @ (gate * torch.sigmoid(gate) * up))
    return out


@pytest.mark.parametrize("shape", [(5, 24, 10, 4, 2), (9, 16, 6, 6, 3), (0, 8, 4, 2, 1)])
def test_reference_matches_per_token_loop_in_fp64(shape):
    case = Case("fused_moe", "fp32", {"shape": shape, "ids": "int64", "masked": True})
    x, w13, w2, weights, ids = (t.double() if t.is_floating_point() else t
                                for t in make_inputs(case))
    expected = naive_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, weights, ids), expected,
                               atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, weights, ids.int()), expected,
                               atol=1e-12, rtol=1e-12)


def test_reference_ignores_experts_held_elsewhere():
    case = Case("fused_moe", "fp32", {"shape": (4, 16, 8, 3, 2), "ids": "int64",
                                      "masked": False})
    x, w13, w2, weights, ids = make_inputs(case)
    held_elsewhere = torch.full_like(ids, -1)
    held_elsewhere[:, 0] = ids[:, 0]
    held_elsewhere[0, 1] = 3
    only_first = fused_moe_ref(x, w13, w2, weights[:, :1], ids[:, :1])
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, weights, held_elsewhere), only_first)


def dequantize_by_hand(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[E, N, K] fp8 * its [E, Sn, Sk] scale stretched over 128-blocks (or all rows / columns
    when Sn / Sk is 1), in fp64."""
    _, n, k = weight.shape
    rows = 128 if scale.shape[1] > 1 else n
    cols = 128 if scale.shape[2] > 1 else k
    full = scale.double().repeat_interleave(rows, 1)[:, :n].repeat_interleave(cols, 2)[:, :, :k]
    return weight.double() * full


@pytest.mark.parametrize("layout", ["block", "expert", "kblock", "nblock"])
@pytest.mark.parametrize("fp8", ["fn", "fnuz"])
def test_fp8_reference_is_the_reference_of_the_dequantized_weights(layout, fp8):
    case = Case("fused_moe", "fp32", {"shape": (9, 200, 128, 4, 3), "ids": "int64",
                                      "masked": True, "fp8": fp8, "scales": layout})
    x, w13, w2, weights, ids, w13_scale, w2_scale = make_inputs(case)
    assert w13.dtype == w2.dtype == FP8[fp8]
    assert w13_scale.shape == fp8_scale_shape(layout, 4, 256, 200)
    got = fused_moe_ref(x.double(), w13, w2, weights, ids, w13_scale, w2_scale)
    expected = naive_moe(x.double(), dequantize_by_hand(w13, w13_scale),
                         dequantize_by_hand(w2, w2_scale), weights.double(), ids)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def fp8_inputs(layout: str, shape: tuple[int, ...] = (4, 72, 128, 3, 2)
               ) -> tuple[torch.Tensor, ...]:
    """Small fp8 inputs for the error checks."""
    return make_inputs(Case("fused_moe", "fp32", {"shape": shape, "ids": "int64",
                                                  "masked": False, "fp8": "fn",
                                                  "scales": layout}))


@pytest.mark.parametrize("fn", [fused_moe, fused_moe_ref], ids=["kernel", "reference"])
def test_bad_fp8_scales_are_clear_errors(fn):
    x, w13, w2, weights, ids, w13_scale, w2_scale = fp8_inputs("block")
    with pytest.raises(ValueError, match="both w13_scale and w2_scale"):
        fn(x, w13, w2, weights, ids, w13_scale)
    with pytest.raises(ValueError, match="w2_scale \\(3, 2, 1\\) does not fit"):
        fn(x, w13, w2, weights, ids, w13_scale, w2_scale.repeat(1, 2, 1))
    with pytest.raises(ValueError, match="must be fp8"):
        fn(x, w13.float(), w2.float(), weights, ids, w13_scale, w2_scale)
    # 128-row blocks of w13 would hold gate and up rows when I % 128 != 0
    x, w13, w2, weights, ids, w13_scale, w2_scale = fp8_inputs("nblock", (4, 72, 96, 3, 2))
    with pytest.raises(ValueError, match="I % 128 == 0"):
        fn(x, w13, w2, weights, ids, w13_scale, w2_scale)
    if fn is fused_moe_ref:  # one scale row per expert is fine at any I (kernel: CASES)
        x, w13, w2, weights, ids, w13_scale, w2_scale = fp8_inputs("kblock", (4, 72, 96, 3, 2))
        assert fn(x, w13, w2, weights, ids, w13_scale, w2_scale).shape == x.shape


def test_fp8_weights_without_scales_are_a_clear_error():
    x, w13, w2, weights, ids, _, _ = fp8_inputs("block")
    with pytest.raises(ValueError, match="or fp8 with scales"):
        fused_moe(x, w13, w2, weights, ids)


@pytest.mark.parametrize("arch", ("default", *KNOWN_ARCHS))
def test_every_plan_keeps_tiles_inside_one_scale_block(arch):
    for rows in (1, 16, 17, 64, 65, 512, 513, 100000):
        plan = moe_plan(rows, 1, arch)
        assert 128 % plan.block_k == 0 and 128 % plan.block_n == 0, (arch, rows, plan)


@pytest.mark.parametrize("arch", ("default", *KNOWN_ARCHS))
def test_plan_aligns_in_triton_up_to_the_configured_pairs(arch):
    limit = get_int(load_config("fused_moe", arch), "align_max_pairs")
    assert moe_plan(limit, 128, arch).triton_align
    assert not moe_plan(limit + 1, 128, arch).triton_align


@pytest.mark.parametrize(("tokens", "top_k"), [(1, 8), (3, 8), (4096, 8), (64, 2), (5, 3)])
def test_combine_block_fits_its_register_budget(tokens, top_k):
    c = _combine_constexprs(tokens, top_k, 256)
    assert c["BLOCK_T"] * c["K_PAD"] * c["BLOCK_H"] <= COMBINE_ELEMENTS
    assert c["K_PAD"] >= top_k and 1 <= c["BLOCK_T"] <= next_power_of_2(tokens)
    assert all(v & (v - 1) == 0 for v in c.values())


def test_launcher_takes_the_reference_signature():
    assert same_signature(fused_moe, fused_moe_ref)


def test_mismatched_weights_are_a_clear_error():
    case = Case("fused_moe", "fp32", {"shape": (2, 16, 8, 3, 2), "ids": "int64",
                                      "masked": False})
    x, w13, w2, weights, ids = make_inputs(case)
    with pytest.raises(ValueError, match="is not \\[E, H, I\\]"):
        fused_moe(x, w13, w2.transpose(1, 2), weights, ids)
    with pytest.raises(ValueError, match="must be x's"):
        fused_moe(x, w13.half(), w2, weights, ids)



@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("tokens", [1, 64])
def test_cuda_graph_replays_new_routings_deterministically(tokens, fp8):
    params = {"fp8": "native", "scales": "block"} if fp8 else {}
    case = Case("fused_moe", "bf16", {"shape": (tokens, *QWEN3_30B_A3B), "ids": "int64",
                                      "masked": True, **params})
    x, w13, w2, weights, ids, *scales = make_inputs(case, "cuda")
    static = [x.clone(), weights.clone(), ids.clone()]
    fused_moe(static[0], w13, w2, static[1], static[2], *scales)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(static[0], w13, w2, static[1], static[2], *scales)
    num_experts = QWEN3_30B_A3B[2]
    for shift in (1, 2):
        new_ids = torch.where(ids >= 0, (ids + 37 * shift) % (num_experts + 2), ids)
        new = (x.flip(1), weights.flip(1), new_ids)
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        eager = fused_moe(new[0], w13, w2, new[1], new[2], *scales)
        assert torch.equal(out, eager)
        result = compare(case.id, out, fused_moe_ref(new[0], w13, w2, new[1], new[2], *scales),
                         torch.bfloat16)
        assert result.ok, failure_message(result, case.id)


if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
