"""Attention over the paged KV cache: decode (one query per sequence) and prefill/extend."""

from __future__ import annotations

import torch


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
