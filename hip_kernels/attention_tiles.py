"""Tile-level pieces shared by the paged attention kernels (decode and prefill).

A KV tile is BLOCK_N consecutive positions of one sequence; each position's row is found
through the block table, so any block size works and a tile may span several blocks:

    position p -> kv_layer[block_table[p // bs], 0 (K) or 1 (V), p % bs, kv_head, :]
"""

from __future__ import annotations

import torch

from hip_kernels.triton_compat import jit, tl

StepCache = dict[tuple[str, int], torch.Tensor]
"""Tensors a kernel derives from one step's metadata, built by the first layer that needs
them and reused by the others (the model's AttentionMetadata.step_cache)."""

LOG2_E = 1.4426950408889634
"""Scores are scaled by scale * log2(e) so that the softmax can use exp2."""


@jit
def token_offsets(table_row_ptr, positions, pos_mask, stride_kv_block, stride_kv_tok,
                   KV_BLOCK_SIZE: tl.constexpr):
    """Element offset of each position's K row inside kv_layer, via the block table."""
    block_ids = tl.load(table_row_ptr + positions // KV_BLOCK_SIZE, mask=pos_mask, other=0)
    return block_ids.to(tl.int64) * stride_kv_block + (positions % KV_BLOCK_SIZE) * stride_kv_tok


@jit
def attend_tile(q, k, v, scores_mask, m_i, l_i, acc, qk_scale_log2, UPCAST_DOT: tl.constexpr):
    """One online-softmax step (log2 domain) of a q tile over a K/V tile; returns m, l, acc."""
    if UPCAST_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
    s = tl.where(scores_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing visible yet keeps m = -inf; subtracting 0 then keeps exp2 at 0.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


def check_attention_shapes(kernel: str, q: torch.Tensor, kv_layer: torch.Tensor) -> int:
    """Validate q [*, Hq, D] against kv_layer [NB, 2, bs, Hk, D]; returns GROUP = Hq / Hk."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2 or kv_layer.shape[4] != head_dim:
        raise ValueError(f"{kernel}: kv_layer {tuple(kv_layer.shape)} is not "
                         f"[num_blocks, 2, block_size, num_kv_heads, {head_dim}]")
    if num_q_heads % kv_layer.shape[3]:
        raise ValueError(f"{kernel}: {num_q_heads} q heads is not a multiple of "
                         f"{kv_layer.shape[3]} kv heads")
    if kv_layer.stride(-1) != 1:
        raise ValueError(f"{kernel}: kv_layer's last dim must be contiguous")
    return num_q_heads // kv_layer.shape[3]


def kv_strides(kv_layer: torch.Tensor) -> tuple[int, int, int, int]:
    """(block, K/V, token, head) strides of kv_layer in elements."""
    return kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3)


def tile_starts(query_start_loc: torch.Tensor, block_q: int,
                step_cache: StepCache | None = None) -> torch.Tensor:
    """[B+1] int32 on the device: sequence i's q tiles are tile_starts[i] .. tile_starts[i+1]-1,
    at ``block_q`` query rows a tile (no host sync). Built once per step when a ``step_cache``
    is given: about six small launches a layer otherwise."""
    key = ("tile_starts", block_q)
    cached = None if step_cache is None else step_cache.get(key)
    if cached is not None:
        return cached
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    starts = torch.zeros(query_start_loc.shape[0], dtype=torch.int32,
                         device=query_start_loc.device)
    starts[1:] = torch.cumsum(torch.div(q_lens + block_q - 1, block_q, rounding_mode="floor"), 0)
    if step_cache is not None:
        step_cache[key] = starts
    return starts
