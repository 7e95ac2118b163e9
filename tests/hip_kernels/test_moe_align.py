"""moe_align against moe_align_ref and the tile contract (interpreter on CPU, and GPU); the
reference against the contract checked from its definition."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from kernel_testing import (
    Case,
    CaseResult,
    reference_tests,
    run_cases_main,
    same_signature,
)

from hip_kernels.moe_align import MoeTiles, max_tiles, moe_align, moe_align_ref

# (T, K, E, block_m, ids dtype, routing): one program (T * K <= 32) and several, E not a power
# of two, more pairs than one histogram step (1024), every id invalid, and the empty batch.
ALIGN_ROUTINGS = ((5, 2, 6, 1, "int32", "fixed"), (5, 2, 6, 4, "int64", "fixed"),
                  (5, 2, 6, 16, "int32", "fixed"), (1, 8, 128, 16, "int64", "distinct"),
                  (33, 3, 8, 16, "int32", "masked"), (100, 3, 40, 4, "int64", "strided"),
                  (64, 8, 128, 16, "int64", "masked"), (1500, 1, 3, 1, "int32", "repeats"),
                  (4, 2, 3, 4, "int64", "invalid"), (0, 2, 6, 4, "int64", "distinct"))
CASES = [Case("moe_align", ids, {"tokens": tokens, "top_k": top_k, "experts": experts,
                                 "block_m": block_m, "routing": routing})
         for tokens, top_k, experts, block_m, ids, routing in ALIGN_ROUTINGS]
GPU_CASES = [Case("moe_align", "int64", {"tokens": tokens, "top_k": 8, "experts": 128,
                                         "block_m": block_m, "routing": "masked"})
             for tokens, block_m in ((1, 16), (64, 16), (256, 16), (1000, 64), (4096, 128))]
FIXED_IDS = [[0, 2], [2, -1], [5, 2], [9, 0], [2, 5]]


def make_routing(tokens: int, top_k: int, experts: int, routing: str, gen: torch.Generator,
                 device: str = "cpu", dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """ids [T, K] of ``dtype``. ``distinct``: K different experts a token; ``masked`` also
    sets about a third to -1 or >= E (experts on other ranks); ``repeats``: drawn with
    replacement; ``invalid``: none in [0, E); ``strided``: a column-strided view (stride 2);
    ``fixed``: FIXED_IDS."""
    if routing == "fixed":
        return torch.tensor(FIXED_IDS, dtype=dtype, device=device)
    if "repeats" in routing:
        ids = torch.randint(0, experts, (tokens, top_k), generator=gen, device=device)
    else:
        scores = torch.rand(tokens, max(experts, top_k), generator=gen, device=device)
        ids = scores.argsort(dim=1)[:, :top_k]
    if "masked" in routing or routing == "invalid":
        drop = torch.rand(tokens, top_k, generator=gen, device=device)
        if routing == "invalid":
            drop = drop * 0.3
        ids = torch.where(drop < 0.15, -1, torch.where(drop < 0.3, experts + 2, ids))
    ids = ids.to(dtype)
    if "strided" in routing:
        ids = torch.stack([ids, torch.full_like(ids, -7)], dim=2).flatten(1)[:, ::2]
        assert ids.stride(1) == 2
    return ids


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """The kernel's tiles keep the contract and equal the torch reference's, bit for bit."""
    p = case.params
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.int32 if case.dtype == "int32" else torch.int64
    ids = make_routing(p["tokens"], p["top_k"], p["experts"], p["routing"], gen, device, dtype)
    tiles = moe_align(ids, p["experts"], p["block_m"])
    errors = tile_contract_errors(ids, p["experts"], p["block_m"], tiles)
    expected = moe_align_ref(ids, p["experts"], p["block_m"])
    errors += [f"{name} differs from moe_align_ref" for name, got, want
               in zip(MoeTiles._fields, tiles, expected) if not torch.equal(got, want)]
    return CaseResult(case.id, not errors, 0.0 if not errors else float("inf"),
                      "; ".join(errors))


def tile_contract_errors(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                         tiles: MoeTiles) -> list[str]:
    """What is wrong with ``tiles`` as an alignment of ``topk_ids``, from the definition:
    int32 buffers of max_tiles sizes; each expert's run holds its valid pairs in increasing
    order, then padding (num_pairs) up to a multiple of block_m; runs in expert order; unused
    tiles have expert E and hold only padding; invalid ids appear nowhere."""
    flat = topk_ids.reshape(-1).tolist()
    num_pairs, num_tiles = len(flat), max_tiles(len(flat), num_experts, block_m)
    if any(t.dtype != torch.int32 for t in tiles):
        return [f"dtypes {[t.dtype for t in tiles]} are not int32"]
    if (tiles.sorted_pair_ids.numel(), tiles.tile_expert_ids.numel()) != \
            (num_tiles * block_m, num_tiles):
        return [f"sizes {tiles.sorted_pair_ids.numel()}, {tiles.tile_expert_ids.numel()} for "
                f"max_tiles {num_tiles} of {block_m} rows"]
    runs: dict[int, list[int]] = {e: [] for e in range(num_experts)}
    expected: list[int] = []
    for expert, count in sorted(Counter(e for e in flat if 0 <= e < num_experts).items()):
        pad = -count % block_m
        runs[expert] = [p for p, e in enumerate(flat) if e == expert] + [num_pairs] * pad
        expected += [expert] * ((count + pad) // block_m)
    used = len(expected)
    expected += [num_experts] * (num_tiles - used)
    errors = []
    if tiles.tile_expert_ids.tolist() != expected:
        errors.append(f"tile_expert_ids {tiles.tile_expert_ids.tolist()} != {expected}")
    if tiles.num_tokens_post_padded.tolist() != [used * block_m]:
        errors.append(f"num_tokens_post_padded {tiles.num_tokens_post_padded.tolist()} != "
                      f"[{used * block_m}]")
    rows = tiles.sorted_pair_ids.tolist()
    want = [p for e in range(num_experts) for p in runs[e]]
    want += [num_pairs] * (num_tiles * block_m - len(want))
    if rows != want:
        errors.append(f"sorted_pair_ids {rows} != {want}")
    return errors


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("routing", ["fixed", "masked", "repeats,strided", "invalid"])
def test_reference_align_keeps_the_tile_contract(block_m, routing):
    ids = make_routing(13, 3, 6, routing, torch.Generator().manual_seed(1))
    assert tile_contract_errors(ids, 6, block_m, moe_align_ref(ids, 6, block_m)) == []


def test_contract_check_catches_a_misplaced_pair():
    ids = torch.tensor(FIXED_IDS)
    good = moe_align_ref(ids, 6, 4)
    swapped = good.sorted_pair_ids.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert tile_contract_errors(ids, 6, 4, good._replace(sorted_pair_ids=swapped))
    assert tile_contract_errors(ids, 6, 4, good._replace(
        tile_expert_ids=good.tile_expert_ids.flip(0)))


def test_align_launcher_returns_empty_tiles_for_no_pairs_without_a_launch():
    tiles = moe_align(torch.empty(0, 8, dtype=torch.int64), 128, 16)
    assert [t.numel() for t in tiles] == [0, 0, 1]
    assert tiles.num_tokens_post_padded.tolist() == [0]
    assert tile_contract_errors(torch.empty(0, 8), 128, 16, tiles) == []


def test_align_launcher_wants_two_dimensional_ids():
    with pytest.raises(ValueError, match=r"is not \[T, K\]"):
        moe_align(torch.zeros(8, dtype=torch.int64), 4, 16)


def test_launcher_takes_the_reference_signature():
    assert same_signature(moe_align, moe_align_ref)



if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
