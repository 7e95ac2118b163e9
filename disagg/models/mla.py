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
V (the form transformers computes), then attend causally (ops.mla_prefill_attention: Triton on
GPU; the rope key stays one vector per position, shared by the heads). Decode-only steps stay
in latent space ("absorbed"): with W_kv_b split per head into W_UK [nope, L] and W_UV [v, L],

    q_lat_h = [q_nope,h W_UK,h | q_pe,h]                      [L + rope]
    o_lat_h = softmax(scale q_lat_h . latent_t) latent_t[:L]   ops.paged_mla_decode (Triton on GPU)
    o_h     = o_lat_h W_UV,h^T                                 [v]

so a decode step reads each cached latent once for all heads and never up-projects the context.

Tensor parallelism splits the heads: q (or q_b), kv_b and o_proj's input columns are sliced per
rank, the latent projection (kv_a, its norm, q_a) is replicated, and so is the cache: every
rank writes and reads the whole latent (one KV head, replicated as ``kv_head_range`` does when
ranks outnumber KV heads), so a P/D transfer sends each receiving rank the whole latent once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disagg.models.arch import ArchConfig
from disagg.models.layers import AttentionMetadata, RMSNorm
from disagg.models.ops import Ops
from disagg.models.parallel import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    TPContext,
)
from hip_kernels.kv_fp8 import dequantize_ref


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


LATENT_NORM_EPS = 1e-6
"""eps of q_a_layernorm and kv_a_layernorm (DeepSeek's code fixes it)."""

class MLAttention(nn.Module):
    """One layer's latent attention; parameter names are the checkpoint's."""

    def __init__(self, arch: ArchConfig, layer_idx: int, ops: Ops,
                 tp: TPContext = TPContext()) -> None:
        super().__init__()
        mla = arch.mla
        assert mla is not None
        self.mla, self.layer_idx, self.ops = mla, layer_idx, ops
        self.num_heads = arch.num_heads // tp.size
        """This rank's query heads (all of them at TP 1); the latent is every rank's."""
        self.half_width = arch.head_dim
        qk_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        h, bias = arch.hidden_size, arch.attention_bias
        if mla.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(h, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = ReplicatedLinear(h, mla.q_lora_rank, bias=bias)
            # the latent norms' eps is 1e-6 whatever rms_norm_eps says, as in DeepSeek's own
            # code and transformers (vLLM takes rms_norm_eps; the checkpoints all say 1e-6)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS, ops)
            self.q_b_proj = ColumnParallelLinear(mla.q_lora_rank, self.num_heads * qk_dim,
                                                 bias=False)
        self.kv_a_proj_with_mqa = ReplicatedLinear(h, mla.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS, ops)
        # Plain nn.Linear, never fp8: the absorbed decode splits its weight per head.
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank,
                                   self.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                                   bias=False)
        self.o_proj = RowParallelLinear(self.num_heads * mla.v_head_dim, h, bias, tp)
        self.k_scale = self.v_scale = 1.0
        """An fp8 cache's scales (disagg/engine/kv_quant.py); the latent uses k_scale whole."""

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
            out = self._attend(q_nope, q_pe, kv_layer, attn)
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
                                          attn.seq_lens, mla.softmax_scale, mla.kv_lora_rank,
                                          self.k_scale)
        return torch.einsum("bhl,hvl->bhv", o_lat, w_uv)

    def _store(self, latent: torch.Tensor, kv_layer: torch.Tensor,
               slot_mapping: torch.Tensor) -> None:
        """Write [T, latent] into the cache: first half as the K head, the rest as the V head."""
        pad = 2 * self.half_width - latent.shape[-1]
        if pad:
            latent = F.pad(latent, (0, pad))
        k, v = latent.view(latent.shape[0], 2, 1, self.half_width).unbind(1)
        self.ops.reshape_and_cache(k.contiguous(), v.contiguous(), kv_layer, slot_mapping,
                                   self.k_scale, self.k_scale)

    def _latents(self, kv_layer: torch.Tensor, table: torch.Tensor, seq_len: int
                 ) -> torch.Tensor:
        """The first ``seq_len`` cached latents of one sequence, [seq_len, latent]."""
        block_size = kv_layer.shape[2]
        blocks = table[:-(-seq_len // block_size)].long()
        halves = kv_layer[blocks]  # [n, 2, block_size, 1, half]
        both = halves[:, :, :, 0].permute(0, 2, 1, 3).reshape(-1, 2 * self.half_width)
        return dequantize_ref(both[:seq_len, :self.mla.latent_dim], self.k_scale,
                              self.kv_a_layernorm.weight.dtype)  # the activations' dtype

    def _attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_layer: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        """Causal attention of each sequence's queries (its last positions) over its latents,
        up-projected to per-head keys and values in one matmul (ops.mla_prefill_attention)."""
        mla = self.mla
        starts = attn.host_query_start_loc or tuple(attn.query_start_loc.tolist())
        seq_lens = attn.host_seq_lens or tuple(attn.seq_lens.tolist())
        # a sequence with no query this step contributes no keys either
        kv_lens = [n if starts[i + 1] > starts[i] else 0 for i, n in enumerate(seq_lens)]
        latent = torch.cat([self._latents(kv_layer, attn.block_tables[i], n)
                            for i, n in enumerate(kv_lens) if n])
        c, k_pe = latent.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c).view(latent.shape[0], self.num_heads, -1)
        k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        q_lens = attn.query_start_loc[1:] - attn.query_start_loc[:-1]  # on the device: no sync
        kv_start = F.pad(torch.cumsum(torch.where(q_lens > 0, attn.seq_lens, 0), 0,
                                      dtype=torch.int32), (1, 0))
        return self.ops.mla_prefill_attention(q_nope, q_pe, k_nope, k_pe, v,
                                              attn.query_start_loc, kv_start,
                                              mla.softmax_scale)
