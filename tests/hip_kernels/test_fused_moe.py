"""fused_moe against fused_moe_ref (interpreter on CPU, and GPU), over both align paths; the
reference against a per-token loop. The align step itself: test_moe_align.py."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import pytest
import torch
from kernel_testing import (
    Case,
    CaseResult,
    compare,
    failure_message,
    interpreter_results,
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
from hip_kernels.launch_config import KNOWN_ARCHS, OVERRIDE_ENV, get_int, load_config
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
QWEN3_30B_A3B = (2048, 768, 128, 8)  # H, I, E, K
MIXTRAL_8X7B = (4096, 14336, 8, 2)
GPU_CASES = [
    Case("fused_moe", "bf16", {"shape": (tokens, *model), "ids": "int64", "masked": masked})
    for tokens, model, masked in ((1, QWEN3_30B_A3B, False), (64, QWEN3_30B_A3B, False),
                                  (1000, QWEN3_30B_A3B, True), (4096, QWEN3_30B_A3B, False),
                                  (64, MIXTRAL_8X7B, False), (777, MIXTRAL_8X7B, True))
]


def make_inputs(case: Case, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """x, w13, w2 scaled so every activation is O(1); routing per ``make_routing`` (distinct
    experts, masked when the case says so); softmax weights, strided like the ids."""
    tokens, hidden, inter, experts, top_k = case.params["shape"]
    gen = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, device=device)
                                       * scale).to(case.torch_dtype)
    x = randn(tokens, hidden)
    w13 = randn(experts, 2 * inter, hidden, scale=hidden**-0.5)
    w2 = randn(experts, hidden, inter, scale=inter**-0.5)
    routing = case.params.get("routing", "distinct") + (",masked" if case.params["masked"]
                                                        else "")
    ids_dtype = torch.int32 if case.params["ids"] == "int32" else torch.int64
    ids = make_routing(tokens, top_k, experts, routing, gen, device, ids_dtype)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen, device=device), dim=1)
    if "strided" in routing:
        weights = torch.stack([weights, torch.zeros_like(weights)], dim=2).flatten(1)[:, ::2]
    return x, w13, w2, weights, ids


@contextlib.contextmanager
def kernel_config(overrides: dict[str, dict[str, int]]) -> Iterator[None]:
    """Launch-config overrides (DISAGG_KERNEL_CONFIG) for the duration of one case."""
    previous = os.environ.get(OVERRIDE_ENV)
    os.environ[OVERRIDE_ENV] = json.dumps(overrides)
    try:
        yield
    finally:
        if previous is None:
            del os.environ[OVERRIDE_ENV]
        else:
            os.environ[OVERRIDE_ENV] = previous


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Random routing at the case's shape; kernel vs reference (torch align if asked)."""
    args = make_inputs(case, device)
    if case.params.get("align") != "torch":
        return compare(case.id, fused_moe(*args), fused_moe_ref(*args), case.torch_dtype)
    with kernel_config({"fused_moe": {"align_max_pairs": 0}}):
        if moe_plan(args[4].numel(), args[1].shape[0]).triton_align:
            return CaseResult(case.id, False, float("inf"), "the override did not apply")
        out = fused_moe(*args)
    return compare(case.id, out, fused_moe_ref(*args), case.torch_dtype)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, CaseResult]:
    """All CASES run once in a TRITON_INTERPRET=1 child process."""
    return interpreter_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference_in_interpreter(case: Case, interpreted: dict[str, CaseResult]):
    result = interpreted.get(case.id)
    assert result is not None and result.ok, failure_message(result, case.id)


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
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_matches_reference_on_gpu(case: Case):
    result = run_case(case, "cuda")
    assert result.ok, failure_message(result, case.id)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64])
def test_cuda_graph_replays_new_routings_deterministically(tokens):
    case = Case("fused_moe", "bf16", {"shape": (tokens, *QWEN3_30B_A3B), "ids": "int64",
                                      "masked": True})
    x, w13, w2, weights, ids = make_inputs(case, "cuda")
    static = [x.clone(), weights.clone(), ids.clone()]
    fused_moe(static[0], w13, w2, static[1], static[2])  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(static[0], w13, w2, static[1], static[2])
    num_experts = QWEN3_30B_A3B[2]
    for shift in (1, 2):
        new_ids = torch.where(ids >= 0, (ids + 37 * shift) % (num_experts + 2), ids)
        new = (x.flip(1), weights.flip(1), new_ids)
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        eager = fused_moe(new[0], w13, w2, new[1], new[2])
        assert torch.equal(out, eager)
        result = compare(case.id, out, fused_moe_ref(new[0], w13, w2, new[1], new[2]),
                         torch.bfloat16)
        assert result.ok, failure_message(result, case.id)


if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
