"""MoE align: (token, k) pairs sorted by expert into BLOCK_M-row tiles, each of one expert.

Pair p = t * K + k routes token t to expert topk_ids[t, k]. ``moe_align`` sorts the pairs by
expert and pads each expert's run to a multiple of BLOCK_M, so that every BLOCK_M-row tile
belongs to one expert; pairs whose expert is not on this rank are dropped there:

    sorted_pair_ids  | p p p pad | p p p p | p pad pad pad | p pad pad pad | unused ... |
    tile_expert_ids  |    e0     |   e2    |      e2       |      e5       |  E  ...  E |
                     |<-------------- num_tokens_post_padded ------------>|

    one launch, program c (one per chunk of <= 64 pairs):
        counts[e] over all pairs -> padded run starts -> scatter pair chunk c; write its share
        of the padding rows and of tile_expert_ids

Padding rows hold the pair id ``num_pairs``; tiles past the used rows carry the expert id E.
Everything is sized from shapes (no host sync, so a CUDA graph can capture it) and no atomics
are used: the tiles are deterministic and equal ``moe_align_ref``'s (torch, about 30 launches)
bit for bit. ``fused_moe`` walks these tiles in its GEMMs and picks the path: this kernel up
to its config's align_max_pairs (configs/<arch>/fused_moe.json), the reference past it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hip_kernels.launch_config import KernelSpec
from hip_kernels.triton_compat import cdiv, jit, next_power_of_2, require_triton, tl


class MoeTiles(NamedTuple):
    """(token, k) pairs sorted by expert in BLOCK_M-row tiles: what both GEMM kernels walk."""

    sorted_pair_ids: torch.Tensor
    """int32 [max_tiles * BLOCK_M]: pair ids t * K + k, expert-major; padding is num_pairs."""
    tile_expert_ids: torch.Tensor
    """int32 [max_tiles]: each tile's expert; E for the unused tiles at the end."""
    num_tokens_post_padded: torch.Tensor
    """int32 [1]: rows in use (the padded runs of all experts), left on the device."""


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Most tiles any routing can need: each expert present pads at most block_m - 1 rows."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeTiles:
    """Sort pairs by expert (stably), pad each expert's run to a multiple of block_m.

    Pairs with an id outside [0, num_experts) sort into a last bucket E whose slots lie past
    the returned buffer, so they reach no tile. Only device ops sized from shapes: no host
    sync and no host-to-device copy, so a CUDA graph can capture it (about 30 launches).
    """
    experts = topk_ids.reshape(-1).long()
    num_pairs, device = experts.numel(), experts.device
    valid = (experts >= 0) & (experts < num_experts)
    experts = torch.where(valid, experts, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))
    padded = torch.div(counts[:-1] + block_m - 1, block_m, rounding_mode="floor") * block_m
    padded_ends = torch.cumsum(padded, 0)
    num_rows = max_tiles(num_pairs, num_experts, block_m) * block_m
    slot_starts = torch.cat([padded_ends - padded, padded_ends.new_full((1,), num_rows)])
    order = torch.argsort(experts, stable=True)
    sorted_experts = experts[order]
    run_starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - run_starts[sorted_experts]
    sorted_pair_ids = torch.full((num_rows + num_pairs,), num_pairs, dtype=torch.int32,
                                 device=device)
    sorted_pair_ids[slot_starts[sorted_experts] + rank] = order.to(torch.int32)
    tile_starts = torch.arange(0, num_rows, block_m, device=device)
    tile_expert_ids = torch.searchsorted(padded_ends, tile_starts, right=True)
    return MoeTiles(sorted_pair_ids[:num_rows], tile_expert_ids.to(torch.int32),
                    padded_ends[-1:].to(torch.int32))


@jit
def _pair_experts(topk_ids_ptr, first_pair, num_pairs, top_k, stride_ids_tok, stride_ids_k,
                  num_experts, CHUNK: tl.constexpr):
    """Pairs first_pair + [0, CHUNK) and their experts (int32); -1 for an id outside [0, E)
    and for a pair past num_pairs."""
    pairs = first_pair + tl.arange(0, CHUNK)
    in_range = pairs < num_pairs
    ids = tl.load(topk_ids_ptr + (pairs // top_k) * stride_ids_tok
                  + (pairs % top_k) * stride_ids_k, mask=in_range, other=-1)
    valid = in_range & (ids >= 0) & (ids < num_experts)
    return pairs, tl.where(valid, ids, -1).to(tl.int32)


@jit
def _align_scatter(topk_ids_ptr, sorted_pair_ids_ptr, first_pair, slot_base, lanes, num_pairs,
                   top_k, stride_ids_tok, stride_ids_k, num_experts, CHUNK: tl.constexpr):
    """Write each valid pair of the chunk to slot_base[its expert] + its rank among the
    chunk's pairs of that expert: increasing pair ids within an expert, as a stable sort."""
    pairs, experts = _pair_experts(topk_ids_ptr, first_pair, num_pairs, top_k, stride_ids_tok,
                                   stride_ids_k, num_experts, CHUNK)
    base = tl.sum(tl.where(experts[:, None] == lanes[None, :], slot_base[None, :], 0), axis=1)
    order = tl.arange(0, CHUNK)
    earlier = (experts[:, None] == experts[None, :]) & (order[None, :] < order[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    tl.store(sorted_pair_ids_ptr + base + rank, pairs, mask=experts >= 0)


@jit
def _align_tiles(sorted_pair_ids_ptr, tile_expert_ids_ptr, first_tile, starts, ends, counts,
                 lanes, num_pairs, num_experts, num_tiles, BLOCK_M: tl.constexpr,
                 TILE_CHUNK: tl.constexpr):
    """Tiles first_tile + [0, TILE_CHUNK): their expert (E past the used rows) and padding.

    A tile's expert is the number of padded runs ending at or before its first row (the
    torch ``searchsorted(..., right=True)``); rows past its expert's count are padding. Pair
    rows are left to ``_align_scatter``, so no address is written twice.
    """
    tiles = first_tile + tl.arange(0, TILE_CHUNK)
    tile_start = tiles * BLOCK_M
    ended = (ends[None, :] <= tile_start[:, None]) & (lanes < num_experts)[None, :]
    expert = tl.sum(ended.to(tl.int32), axis=1)
    this = lanes[None, :] == expert[:, None]
    run_start = tl.sum(tl.where(this, starts[None, :], 0), axis=1)
    run_count = tl.sum(tl.where(this, counts[None, :], 0), axis=1)
    rows = tile_start[:, None] + tl.arange(0, BLOCK_M)[None, :]
    padding = rows - run_start[:, None] >= run_count[:, None]
    in_range = tiles < num_tiles
    tl.store(sorted_pair_ids_ptr + rows, tl.zeros_like(rows) + num_pairs,
             mask=padding & in_range[:, None])
    tl.store(tile_expert_ids_ptr + tiles, expert, mask=in_range)


@jit
def _expert_counts(topk_ids_ptr, first_pair, num_pairs, top_k, stride_ids_tok, stride_ids_k,
                   num_experts, EXPERTS: tl.constexpr, HIST_CHUNK: tl.constexpr):
    """Pairs per expert: over all pairs, and over the pairs before first_pair."""
    counts = tl.zeros([EXPERTS], tl.int32)
    before = tl.zeros([EXPERTS], tl.int32)
    for chunk_start in range(0, num_pairs, HIST_CHUNK):
        pairs, experts = _pair_experts(topk_ids_ptr, chunk_start, num_pairs, top_k,
                                       stride_ids_tok, stride_ids_k, num_experts, HIST_CHUNK)
        valid = experts >= 0
        counts += tl.histogram(experts, EXPERTS, mask=valid)
        before += tl.histogram(experts, EXPERTS, mask=valid & (pairs < first_pair))
    return counts, before


@jit
def _moe_align_kernel(
        topk_ids_ptr, sorted_pair_ids_ptr, tile_expert_ids_ptr, num_tokens_post_padded_ptr,
        num_pairs, top_k, stride_ids_tok, stride_ids_k, num_experts, num_tiles,
        BLOCK_M: tl.constexpr, PAIR_CHUNK: tl.constexpr, EXPERTS: tl.constexpr,
        TILE_CHUNK: tl.constexpr, HIST_CHUNK: tl.constexpr):
    """Program c: count every pair's expert (each program does, so none waits on another),
    then scatter pair chunk c and write tile chunks c, c + programs, ..."""
    pid = tl.program_id(0)
    first_pair = pid * PAIR_CHUNK
    counts, before = _expert_counts(topk_ids_ptr, first_pair, num_pairs, top_k, stride_ids_tok,
                                    stride_ids_k, num_experts, EXPERTS, HIST_CHUNK)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    lanes = tl.arange(0, EXPERTS)
    _align_scatter(topk_ids_ptr, sorted_pair_ids_ptr, first_pair, starts + before, lanes,
                   num_pairs, top_k, stride_ids_tok, stride_ids_k, num_experts, PAIR_CHUNK)
    for first_tile in range(pid * TILE_CHUNK, num_tiles, tl.num_programs(0) * TILE_CHUNK):
        _align_tiles(sorted_pair_ids_ptr, tile_expert_ids_ptr, first_tile, starts, ends, counts,
                     lanes, num_pairs, num_experts, num_tiles, BLOCK_M, TILE_CHUNK)
    tl.store(num_tokens_post_padded_ptr, tl.sum(padded, axis=0), mask=pid == 0)


ALIGN_MAX_CHUNK = 64
"""Pairs (and tiles) per scatter step of the align kernel: its rank matrix is [chunk, chunk]."""
ALIGN_MATRIX_ELEMENTS = 4096
"""Cap on a step's [chunk, experts] one-hot matrix (a few dozen registers a thread)."""
ALIGN_HIST_CHUNK = (256, 1024)
"""Ids per histogram step: at least a whole CTA's lanes, at most 1024."""


def _align_constexprs(num_pairs: int, num_experts: int, block_m: int) -> dict[str, int]:
    """The align kernel's block sizes for this routing shape."""
    experts = next_power_of_2(num_experts)
    per_step = max(1, min(ALIGN_MAX_CHUNK, ALIGN_MATRIX_ELEMENTS // experts))
    num_tiles = max_tiles(num_pairs, num_experts, block_m)
    hist_low, hist_high = ALIGN_HIST_CHUNK
    return {"BLOCK_M": block_m, "PAIR_CHUNK": min(next_power_of_2(num_pairs), per_step),
            "EXPERTS": experts, "TILE_CHUNK": min(next_power_of_2(num_tiles), per_step),
            "HIST_CHUNK": min(max(next_power_of_2(num_pairs), hist_low), hist_high)}


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeTiles:
    """``moe_align_ref`` in one Triton launch (the same tensors, bit for bit).

    topk_ids [T, K] int32/int64, any strides. One program per PAIR_CHUNK (<= 64) pairs; each
    histograms all pairs again (1024 a step), so the work grows with (T * K)^2: ``fused_moe``
    uses it up to the config's align_max_pairs. T * K = 0 launches nothing.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"moe_align: topk_ids {tuple(topk_ids.shape)} is not [T, K]")
    num_pairs, device = topk_ids.numel(), topk_ids.device
    num_tiles = max_tiles(num_pairs, num_experts, block_m)
    sorted_pair_ids = torch.empty(num_tiles * block_m, dtype=torch.int32, device=device)
    tile_expert_ids = torch.empty(num_tiles, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return MoeTiles(sorted_pair_ids, tile_expert_ids,
                        torch.zeros(1, dtype=torch.int32, device=device))
    require_triton("moe_align")
    num_tokens_post_padded = torch.empty(1, dtype=torch.int32, device=device)
    constexprs = _align_constexprs(num_pairs, num_experts, block_m)
    grid = (cdiv(num_pairs, constexprs["PAIR_CHUNK"]),)
    _moe_align_kernel[grid](
        topk_ids, sorted_pair_ids, tile_expert_ids, num_tokens_post_padded, num_pairs,
        topk_ids.shape[1], topk_ids.stride(0), topk_ids.stride(1), num_experts, num_tiles,
        **constexprs, num_warps=4)
    return MoeTiles(sorted_pair_ids, tile_expert_ids, num_tokens_post_padded)


_ALIGN_POINTERS = {"topk_ids_ptr": "*i64", "sorted_pair_ids_ptr": "*i32",
                   "tile_expert_ids_ptr": "*i32", "num_tokens_post_padded_ptr": "*i32"}
_ALIGN_INTS = ("num_pairs", "top_k", "stride_ids_tok", "stride_ids_k", "num_experts",
               "num_tiles")


def align_spec(num_pairs: int, num_experts: int, block_m: int) -> KernelSpec:
    """The align kernel for int64 ids at one routing shape (``fused_moe.aot_specs`` adds one
    per routing that aligns in Triton)."""
    c = _align_constexprs(num_pairs, num_experts, block_m)
    name = (f"moe_align[i64,m{c['BLOCK_M']}p{c['PAIR_CHUNK']}e{c['EXPERTS']}"
            f"t{c['TILE_CHUNK']}]")
    signature = {**_ALIGN_POINTERS, **dict.fromkeys(_ALIGN_INTS, "i32"),
                 **dict.fromkeys(c, "constexpr")}
    return KernelSpec(name=name, fn=_moe_align_kernel, signature=signature, constexprs=c,
                      aligned=(), num_warps=4, num_stages=1)
