"""Multi-head latent attention (DeepSeek-V2/V3) over the paged cache.

Per token, one latent is cached per layer instead of per-head K and V:

    c      = RMSNorm(x W_kv_a[:kv_lora_rank])      [kv_lora_rank]      (512)
    k_pe   = rope(x W_kv_a[kv_lora_rank:])         [qk_rope_head_dim]  (64, shared by all heads)
    latent = [c | k_pe]                            576 elements

    head h:  k_h = [c W_kv_b,h^K | k_pe]     v_h = c W_kv_b,h^V
             q_h = [q_nope,h | rope(q_pe,h)] from x (through the q_lora bottleneck when the
             checkpoint has one)

The engine's cache keeps its [blocks, layers, 2, block_size, kv_heads, head_dim] shape with
one "KV head" of half the latent: the K half holds latent[:half], the V half latent[half:], so a
block is exactly layers x block_size x latent elements (one pad element for an odd latent) and
transports, prefix caching and mixed-TP routing (one head, replicated) move it unchanged.

Steps with prompt tokens gather each sequence's latents and up-project them to per-head K and
V (the form transformers computes). Decode-only steps stay in latent space ("absorbed"): with
W_kv_b split per head into W_UK [nope, L] and W_UV [v, L],

    q_lat_h = [q_nope,h W_UK,h | q_pe,h]                      [L + rope]
    o_lat_h = softmax(scale q_lat_h . latent_t) latent_t[:L]   ops.paged_mla_decode (Triton on GPU)
    o_h     = o_lat_h W_UV,h^T                                 [v]

so a decode step reads each cached latent once for all heads and never up-projects the context.
Tensor parallelism is not built yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disagg.models.arch import ArchConfig
from disagg.models.layers import AttentionMetadata, RMSNorm
from disagg.models.ops import Ops


def rotate(x: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor,
           interleave: bool) -> torch.Tensor:
    """Rotary embedding of x [T, heads, D] at ``positions``: pairs (x0, x1), (x2, x3)... when
    ``interleave`` (DeepSeek's layout), else the two halves (NeoX). fp32 math, x's dtype out."""
    cs = cos_sin[positions.long()]
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    xf = x.float()
    if interleave:
        even, odd = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
        return out.flatten(-2).to(x.dtype)
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class MLAttention(nn.Module):
    """One layer's latent attention; parameter names are the checkpoint's."""

    def __init__(self, arch: ArchConfig, layer_idx: int, ops: Ops) -> None:
        super().__init__()
        mla = arch.mla
        assert mla is not None
        self.mla, self.layer_idx, self.ops = mla, layer_idx, ops
        self.num_heads = arch.num_heads
        self.half_width = arch.head_dim
        qk_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        h, bias = arch.hidden_size, arch.attention_bias
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, arch.rms_norm_eps, ops)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, mla.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, arch.rms_norm_eps, ops)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank,
                                   self.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.num_heads * mla.v_head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_cache: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; writes this step's latents into the cache first."""
        mla, num_tokens = self.mla, x.shape[0]
        if mla.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(num_tokens, self.num_heads, -1)
        q_nope, q_pe = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim],
                                                  dim=-1)
        c = self.kv_a_layernorm(c)
        q_pe = rotate(q_pe, cos_sin, positions, mla.rope_interleave)
        k_pe = rotate(k_pe.unsqueeze(1), cos_sin, positions, mla.rope_interleave).squeeze(1)
        kv_layer = kv_cache[:, self.layer_idx]
        self._store(torch.cat([c, k_pe], dim=-1), kv_layer, attn.slot_mapping)
        if attn.layer_hook is not None:
            attn.layer_hook(self.layer_idx)
        if attn.decode_only:
            out = self._decode(q_nope, q_pe, kv_layer, attn)
        else:
            out = self._attend(torch.cat([q_nope, q_pe], dim=-1), kv_layer, attn)
        return self.o_proj(out.reshape(num_tokens, -1))

    def _decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_layer: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        """One query per sequence, attention in latent space (absorbed)."""
        mla = self.mla
        w = self.kv_b_proj.weight.view(self.num_heads, mla.qk_nope_head_dim + mla.v_head_dim,
                                       mla.kv_lora_rank)
        w_uk, w_uv = w[:, :mla.qk_nope_head_dim], w[:, mla.qk_nope_head_dim:]
        q_lat = torch.cat([torch.einsum("bhn,hnl->bhl", q_nope, w_uk), q_pe], dim=-1)
        o_lat = self.ops.paged_mla_decode(q_lat.contiguous(), kv_layer, attn.block_tables,
                                          attn.seq_lens, mla.softmax_scale, mla.kv_lora_rank)
        return torch.einsum("bhl,hvl->bhv", o_lat, w_uv)

    def _store(self, latent: torch.Tensor, kv_layer: torch.Tensor,
               slot_mapping: torch.Tensor) -> None:
        """Write [T, latent] into the cache: first half as the K head, the rest as the V head."""
        pad = 2 * self.half_width - latent.shape[-1]
        if pad:
            latent = F.pad(latent, (0, pad))
        k, v = latent.view(latent.shape[0], 2, 1, self.half_width).unbind(1)
        self.ops.reshape_and_cache(k.contiguous(), v.contiguous(), kv_layer, slot_mapping)

    def _latents(self, kv_layer: torch.Tensor, table: torch.Tensor, seq_len: int
                 ) -> torch.Tensor:
        """The first ``seq_len`` cached latents of one sequence, [seq_len, latent]."""
        block_size = kv_layer.shape[2]
        blocks = table[:-(-seq_len // block_size)].long()
        halves = kv_layer[blocks]  # [n, 2, block_size, 1, half]
        both = halves[:, :, :, 0].permute(0, 2, 1, 3).reshape(-1, 2 * self.half_width)
        return both[:seq_len, :self.mla.latent_dim]

    def _attend(self, q: torch.Tensor, kv_layer: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        """Causal attention of each sequence's queries (its last rows) over its latents."""
        mla = self.mla
        starts, seq_lens = attn.query_start_loc.tolist(), attn.seq_lens.tolist()
        out = q.new_empty(q.shape[0], self.num_heads, mla.v_head_dim)
        for i, seq_len in enumerate(seq_lens):
            lo, hi = starts[i], starts[i + 1]
            if hi == lo:
                continue
            latent = self._latents(kv_layer, attn.block_tables[i], seq_len)
            c, k_pe = latent.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
            kv = self.kv_b_proj(c).view(seq_len, self.num_heads, -1)
            k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_pe[:, None].expand(-1, self.num_heads, -1)], dim=-1)
            scores = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), k.float())
            scores = scores * mla.softmax_scale
            first = seq_len - (hi - lo)  # position of this step's first query
            mask = torch.arange(seq_len, device=q.device)[None, :] > (
                torch.arange(hi - lo, device=q.device)[:, None] + first)
            probs = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
            out[lo:hi] = torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)
        return out
