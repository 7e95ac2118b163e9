"""fused_moe against fused_moe_ref (interpreter on CPU, and GPU); the reference and the align
step against naive loops."""

from __future__ import annotations

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

from hip_kernels.fused_moe import fused_moe, fused_moe_ref, max_tiles, moe_align

# shape = (T, H, I, E, K). Rows per expert cdiv(T * K, E) of 1, 2, 13, 22 and 70 reach every
# block_m bucket of the default config; T = 0 is the empty batch.
SHAPES = ((1, 48, 40, 3, 1), (7, 72, 88, 8, 2), (33, 48, 88, 8, 3), (33, 72, 40, 3, 2),
          (70, 48, 40, 3, 3))
CASES = [
    Case("fused_moe", dtype, {"shape": shape, "ids": ids, "masked": masked})
    for dtype in ("fp32", "fp16", "bf16")
    for shape, ids, masked in zip(SHAPES, ("int64", "int32") * 3, (False, True) * 3)
] + [Case("fused_moe", "bf16", {"shape": (0, 48, 40, 3, 2), "ids": "int32", "masked": False}),
     Case("fused_moe", "fp32", {"shape": (33, 48, 88, 8, 3), "ids": "int32", "masked": True})]
QWEN3_30B_A3B = (2048, 768, 128, 8)  # H, I, E, K
MIXTRAL_8X7B = (4096, 14336, 8, 2)
GPU_CASES = [
    Case("fused_moe", "bf16", {"shape": (tokens, *model), "ids": "int64", "masked": masked})
    for tokens, model, masked in ((1, QWEN3_30B_A3B, False), (64, QWEN3_30B_A3B, False),
                                  (1000, QWEN3_30B_A3B, True), (4096, QWEN3_30B_A3B, False),
                                  (64, MIXTRAL_8X7B, False), (777, MIXTRAL_8X7B, True))
]


def make_inputs(case: Case, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """x, w13, w2 scaled so every activation is O(1); distinct experts per token, softmax
    weights; when masked, about a third of the ids are -1 or >= E (experts on other ranks)."""
    tokens, hidden, inter, experts, top_k = case.params["shape"]
    gen = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, device=device)
                                       * scale).to(case.torch_dtype)
    x = randn(tokens, hidden)
    w13 = randn(experts, 2 * inter, hidden, scale=hidden**-0.5)
    w2 = randn(experts, hidden, inter, scale=inter**-0.5)
    ids = torch.rand(tokens, experts, generator=gen, device=device).argsort(dim=1)[:, :top_k]
    if case.params["masked"]:
        drop = torch.rand(tokens, top_k, generator=gen, device=device)
        ids = torch.where(drop < 0.15, -1, torch.where(drop < 0.3, experts + 2, ids))
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen, device=device), dim=1)
    ids = ids.to(torch.int32 if case.params["ids"] == "int32" else torch.int64)
    return x, w13, w2, weights, ids


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Random routing at the case's shape; kernel vs reference."""
    args = make_inputs(case, device)
    return compare(case.id, fused_moe(*args), fused_moe_ref(*args), case.torch_dtype)


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


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_puts_each_valid_pair_once_in_a_tile_of_its_expert(block_m):
    ids = torch.tensor([[0, 2], [2, -1], [5, 2], [9, 0], [2, 5]], dtype=torch.int32)
    num_experts = 6
    tiles = moe_align(ids, num_experts, block_m)
    flat = ids.reshape(-1).tolist()
    num_pairs = len(flat)
    assert tiles.tile_expert_ids.numel() == max_tiles(num_pairs, num_experts, block_m)
    rows = tiles.sorted_pair_ids.view(-1, block_m)
    seen = []
    for tile, expert in zip(rows.tolist(), tiles.tile_expert_ids.tolist()):
        pairs = [p for p in tile if p != num_pairs]
        assert all(flat[p] == expert for p in pairs)
        seen += pairs
    assert sorted(seen) == [p for p, e in enumerate(flat) if 0 <= e < num_experts]
    counts = torch.bincount(torch.tensor([e for e in flat if 0 <= e < num_experts]))
    padded = int(((counts + block_m - 1) // block_m * block_m).sum())
    assert tiles.num_tokens_post_padded.tolist() == [padded]
    used = padded // block_m
    assert (tiles.tile_expert_ids[used:] == num_experts).all()
    assert (tiles.tile_expert_ids[:used] < num_experts).all()


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


if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
