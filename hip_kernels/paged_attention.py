"""Attention over the paged KV cache: decode (one query per sequence) and prefill/extend.

Both kernels walk a sequence's KV in tiles of BLOCK_N positions; each position's row address
comes from the block table (so any block size works and a tile may span blocks):

    position p -> kv_layer[block_table[p // bs], 0 or 1, p % bs, kv_head, :]

GQA: one program handles the GROUP = Hq / Hk query heads that share a kv head, so each K/V
tile is read once for the whole group (rows of the score tile are (token, q head) pairs).
Decode splits long contexts along the sequence (flash-decoding): program (seq, kv head,
split) writes an unnormalised partial (acc, running max, running sum) and a reduce kernel
merges the splits; with one split the first kernel writes the output directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hip_kernels.launch_config import KernelSpec, get_int, load_config
from hip_kernels.triton_compat import (
    cdiv,
    interpreter_upcasts_dot,
    jit,
    next_power_of_2,
    require_triton,
    tl,
)

LOG2_E = 1.4426950408889634


def _gather_kv(kv_layer: torch.Tensor, block_table: torch.Tensor, seq_len: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence as [seq_len, Hk, D] each."""
    block_size = kv_layer.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = kv_layer[block_table[:num_blocks].long()]  # [n, 2, bs, Hk, D]
    k = blocks[:, 0].reshape(-1, *blocks.shape[-2:])[:seq_len]
    v = blocks[:, 1].reshape(-1, *blocks.shape[-2:])[:seq_len]
    return k, v


def paged_decode_attention_ref(q: torch.Tensor, kv_layer: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """One query token per sequence attending to its whole cached context (GQA).

    q [B, Hq, D]; kv_layer [NB, 2, bs, Hk, D]; block_tables [B, max_blocks] int32;
    seq_lens [B] int32 (context length including the current token, already cached).
    Returns [B, Hq, D] in q's dtype. Computed in fp32. Padded to the longest sequence with a
    mask, so it is batched (the CPU engine's decode path).
    """
    bsz, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    group = num_q_heads // num_kv_heads
    max_len = int(seq_lens.max().item()) if bsz else 0
    max_blocks = (max_len + block_size - 1) // block_size
    table = block_tables[:, :max_blocks].long()
    blocks = kv_layer[table]  # [B, nb, 2, bs, Hk, D]
    k = blocks[:, :, 0].reshape(bsz, max_blocks * block_size, num_kv_heads, head_dim)
    v = blocks[:, :, 1].reshape(bsz, max_blocks * block_size, num_kv_heads, head_dim)
    qf = q.float().view(bsz, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bthd->bhgt", qf, k.float()) * scale
    pos = torch.arange(max_blocks * block_size, device=q.device)
    mask = pos[None, :] >= seq_lens.long()[:, None]  # [B, T]
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, v.float())
    return out.reshape(bsz, num_q_heads, head_dim).to(q.dtype)


def paged_prefill_attention_ref(q: torch.Tensor, kv_layer: torch.Tensor,
                                block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a packed batch of query chunks over the paged cache.

    q [T, Hq, D] packs B sequences: sequence i owns rows query_start_loc[i]:query_start_loc[i+1]
    (int32 [B+1]); those rows are positions seq_lens[i]-n_i .. seq_lens[i]-1, where seq_lens [B]
    int32 counts cached prefix + this chunk, all already written into kv_layer. Covers prefill,
    chunked prefill with a cached prefix, and decode (n_i = 1). Returns [T, Hq, D].
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_layer.shape[3]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        lo, hi = starts[i], starts[i + 1]
        n = hi - lo
        if n == 0:
            continue
        k, v = _gather_kv(kv_layer, block_tables[i], seq_len)
        qi = q[lo:hi].float().view(n, num_kv_heads, group, head_dim)
        scores = torch.einsum("nhgd,thd->hgnt", qi, k.float()) * scale
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        oi = torch.einsum("hgnt,thd->nhgd", probs, v.float())
        out[lo:hi] = oi.reshape(n, num_q_heads, head_dim).to(q.dtype)
    return out


@jit
def _token_offsets(table_row_ptr, positions, pos_mask, stride_kv_block, stride_kv_tok,
                   KV_BLOCK_SIZE: tl.constexpr):
    """Element offset of each position's K row inside kv_layer, via the block table."""
    block_ids = tl.load(table_row_ptr + positions // KV_BLOCK_SIZE, mask=pos_mask, other=0)
    return block_ids.to(tl.int64) * stride_kv_block + (positions % KV_BLOCK_SIZE) * stride_kv_tok


@jit
def _attend_tile(q, k, v, scores_mask, m_i, l_i, acc, qk_scale_log2, UPCAST_DOT: tl.constexpr):
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


@jit
def _paged_decode_attention_kernel(
        q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
        qk_scale_log2, split_tokens, num_splits, stride_q_seq, stride_q_head, stride_kv_block,
        stride_kv_kv, stride_kv_tok, stride_kv_head, stride_table_seq, stride_out_seq,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Program (seq, kv head, split): the q-head group over positions of one split."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    q_mask = (rows < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
                mask=q_mask, other=0.0).to(kv_ptr.dtype.element_ty)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq * stride_table_seq
    kv_head_ptr = kv_ptr + kv_head * stride_kv_head
    for tile_start in range(start, end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        pos_mask = positions < end
        offsets = _token_offsets(table_row, positions, pos_mask, stride_kv_block, stride_kv_tok,
                                 KV_BLOCK_SIZE)
        ptrs = kv_head_ptr + offsets[:, None] + dims[None, :]
        tile_mask = pos_mask[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(ptrs, mask=tile_mask, other=0.0)
        v = tl.load(ptrs + stride_kv_kv, mask=tile_mask, other=0.0)
        m_i, l_i, acc = _attend_tile(q, k, v, pos_mask[None, :], m_i, l_i, acc, qk_scale_log2,
                                     UPCAST_DOT)
    if DIRECT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_ptrs = out_ptr + seq * stride_out_seq + heads[:, None] * HEAD_DIM + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # Partials [B, Hq, num_splits, HEAD_DIM] and [B, Hq, num_splits, 2] (max, sum), fp32.
        part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)
        tl.store(part_ml_ptr + part * 2, m_i, mask=rows < GROUP)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=rows < GROUP)


@jit
def _paged_decode_reduce_kernel(part_acc_ptr, part_ml_ptr, seq_lens_ptr, out_ptr, split_tokens,
                                num_splits, stride_out_seq, HEAD_DIM: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    """Program (seq, q head): merge the non-empty splits' partials into the output row."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_used = tl.minimum(tl.cdiv(tl.load(seq_lens_ptr + seq), split_tokens), num_splits)
    dims = tl.arange(0, BLOCK_D)
    part = (seq * tl.num_programs(1) + head) * num_splits
    m_total = float("-inf")
    l_total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for split in range(0, num_used):
        m_split = tl.load(part_ml_ptr + (part + split) * 2)
        l_split = tl.load(part_ml_ptr + (part + split) * 2 + 1)
        acc_split = tl.load(part_acc_ptr + (part + split) * HEAD_DIM + dims,
                            mask=dims < HEAD_DIM, other=0.0)
        m_new = tl.maximum(m_total, m_split)
        alpha = tl.exp2(m_total - m_new)
        beta = tl.exp2(m_split - m_new)
        acc = acc * alpha + acc_split * beta
        l_total = l_total * alpha + l_split * beta
        m_total = m_new
    out = acc / tl.where(l_total == 0.0, 1.0, l_total)
    tl.store(out_ptr + seq * stride_out_seq + head * HEAD_DIM + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)
