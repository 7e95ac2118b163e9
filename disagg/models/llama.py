"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) over the paged KV cache.

Tokens of all scheduled requests are flattened into one batch of T rows; attention reads and
writes the paged cache through ``AttentionMetadata``. Projections are fused (qkv, gate_up); the
loader maps Hugging Face's separate tensors into them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from disagg.models.arch import ArchConfig
from disagg.models.ops import Ops

LayerHook = Callable[[int], None]
"""Called with a layer's index right after that layer wrote this step's K/V into the cache."""


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where this step's tokens sit in the paged cache (the explicit forward context)."""

    slot_mapping: torch.Tensor
    """[T] int64: cache slot of each token (block_id * block_size + offset)."""
    block_tables: torch.Tensor
    """[B, max_blocks] int32: block ids of each sequence."""
    seq_lens: torch.Tensor
    """[B] int32: tokens in the cache for each sequence after this step."""
    query_start_loc: torch.Tensor
    """[B+1] int32: row ranges of each sequence in the flattened batch."""
    decode_only: bool
    """Every sequence contributes exactly one query token."""
    layer_hook: LayerHook | None = None
    """Eager steps only (never a captured graph): e.g. a KV connector streaming each layer out."""


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale."""

    def __init__(self, size: int, eps: float, ops: Ops) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dimension."""
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """GQA self-attention with rotary embeddings over the paged cache."""

    def __init__(self, arch: ArchConfig, layer_idx: int, ops: Ops) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = arch.num_heads, arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(arch.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=arch.attention_bias)
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, ops) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, ops) if arch.qk_norm else None
        self.scale = self.head_dim ** -0.5
        self.ops = ops

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_cache: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; writes this step's K/V into the cache first."""
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        q, k = self.ops.rotary_embedding(positions, q, k, cos_sin)
        kv_layer = kv_cache[:, self.layer_idx]
        self.ops.reshape_and_cache(k, v, kv_layer, attn.slot_mapping)
        if attn.layer_hook is not None:
            attn.layer_hook(self.layer_idx)
        if attn.decode_only:
            out = self.ops.paged_decode_attention(q, kv_layer, attn.block_tables,
                                                  attn.seq_lens, self.scale)
        else:
            out = self.ops.paged_prefill_attention(q, kv_layer, attn.block_tables,
                                                   attn.query_start_loc, attn.seq_lens,
                                                   self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    """Gated SiLU MLP."""

    def __init__(self, arch: ArchConfig, ops: Ops) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP with the residual carried separately (fused add+norm)."""

    def __init__(self, arch: ArchConfig, layer_idx: int, ops: Ops) -> None:
        super().__init__()
        self.self_attn = Attention(arch, layer_idx, ops)
        self.mlp = MLP(arch, ops)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ops)
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                attn: AttentionMetadata, kv_cache: torch.Tensor, cos_sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden, residual) for the next layer."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.ops.fused_add_rms_norm(x, residual, self.input_layernorm.weight,
                                                      self.input_layernorm.eps)
        h = self.self_attn(h, positions, attn, kv_cache, cos_sin)
        h, residual = self.ops.fused_add_rms_norm(h, residual,
                                                  self.post_attention_layernorm.weight,
                                                  self.post_attention_layernorm.eps)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head."""

    def __init__(self, arch: ArchConfig, ops: Ops, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, ops) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ops)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        from hip_kernels.rotary_embedding import make_cos_sin_cache

        self.register_buffer("cos_sin", make_cos_sin_cache(
            max(max_positions, 1), arch.head_dim, arch.rope_theta, arch.rope_scaling,
            device=self.embed_tokens.weight.device), persistent=False)
        self.ops = ops

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, attn, kv_cache, self.cos_sin)
        assert residual is not None
        x, _ = self.ops.fused_add_rms_norm(x, residual, self.norm.weight, self.norm.eps)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden [n, hidden] -> fp32 logits [n, vocab]."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up. Returns loaded names."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name, shard = _map_hf_name(hf_name)
            if name is None or name not in params:
                continue
            param = params[name]
            offset, size = self._shard_range(name, shard)
            with torch.no_grad():
                param.data[offset:offset + size].copy_(tensor.to(param.dtype))
            loaded.add(f"{name}:{shard}" if shard else name)
        return loaded

    def _shard_range(self, name: str, shard: str | None) -> tuple[int, int]:
        """Row range of a fused parameter that a Hugging Face shard fills."""
        a = self.arch
        q, kv, inter = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size
        table = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, inter),
                 "up": (inter, inter)}
        if shard is None:
            return 0, dict(self.named_parameters())[name].shape[0]
        return table[shard]


def _map_hf_name(hf_name: str) -> tuple[str | None, str | None]:
    """Hugging Face parameter name -> (our name, fused shard or None)."""
    name = hf_name.removeprefix("model.")
    if "rotary_emb" in name:
        return None, None
    for proj, shard in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
        if f"self_attn.{proj}." in name:
            return name.replace(f"self_attn.{proj}.", "self_attn.qkv_proj."), shard
    for proj, shard in (("gate_proj", "gate"), ("up_proj", "up")):
        if f"mlp.{proj}." in name:
            return name.replace(f"mlp.{proj}.", "mlp.gate_up_proj."), shard
    return name, None
