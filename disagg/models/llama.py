"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) and its MoE relatives (Mixtral,
Qwen2-MoE, Qwen3-MoE: the MLP of some layers is disagg/models/moe.py) over the paged KV cache.

Tokens of all scheduled requests are flattened into one batch of T rows; attention reads and
writes the paged cache through ``AttentionMetadata``. Projections are fused (qkv, gate_up); the
loader maps Hugging Face's separate tensors into them. Under tensor parallelism (``TPContext``,
disagg/models/parallel.py) each rank holds its heads and intermediate slice and its cache holds
only its KV heads; the fused layouts become local:

    qkv_proj rows:     [ q of local heads | k of local KV heads | v of local KV heads ]
    gate_up_proj rows: [ gate of local slice | up of local slice ]
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from disagg.models.arch import ArchConfig
from disagg.models.expert_parallel import EPContext
from disagg.models.layers import AttentionMetadata, RMSNorm
from disagg.models.mla import MLAttention
from disagg.models.moe import SparseMoeBlock
from disagg.models.ops import Ops
from disagg.models.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    TPContext,
    VocabParallelEmbedding,
    kv_head_range,
)
from disagg.models.quant import (
    dequantize_unkept,
    expand_scale_rows,
    is_fp8,
    quantize_rows,
    scale_weight_name,
)


class Attention(nn.Module):
    """GQA self-attention with rotary embeddings over the paged cache."""

    def __init__(self, arch: ArchConfig, layer_idx: int, ops: Ops, tp: TPContext) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = arch.num_heads // tp.size
        self.num_kv_heads = kv_head_range(arch.num_kv_heads, tp.size, tp.rank)[1]
        self.head_dim = arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = ColumnParallelLinear(arch.hidden_size, self.q_size + 2 * self.kv_size,
                                             bias=arch.attention_bias)
        self.o_proj = RowParallelLinear(self.q_size, arch.hidden_size, bias=arch.o_proj_bias,
                                        tp=tp)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, ops) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, ops) if arch.qk_norm else None
        self.scale = self.head_dim ** -0.5
        self.k_scale = self.v_scale = 1.0
        """An fp8 cache's scales of this layer (disagg/engine/kv_quant.py sets them)."""
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
        kv_layer = kv_cache[:, self.layer_idx]
        # rotary on q and k, and k/v into the cache, in one launch (nothing else reads k)
        q = self.ops.rope_and_cache(positions, q, k, v, cos_sin, kv_layer, attn.slot_mapping,
                                    self.k_scale, self.v_scale)
        if attn.layer_hook is not None:
            attn.layer_hook(self.layer_idx)
        if attn.decode_only:
            out = self.ops.paged_decode_attention(q, kv_layer, attn.block_tables,
                                                  attn.seq_lens, self.scale, self.k_scale,
                                                  self.v_scale)
        else:
            out = self.ops.paged_prefill_attention(q, kv_layer, attn.block_tables,
                                                   attn.query_start_loc, attn.seq_lens,
                                                   self.scale, self.k_scale, self.v_scale,
                                                   step_cache=attn.step_cache)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    """Gated SiLU MLP (this rank's slice of the intermediate features)."""

    def __init__(self, arch: ArchConfig, ops: Ops, tp: TPContext) -> None:
        super().__init__()
        inter = arch.intermediate_size // tp.size
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, 2 * inter,
                                                 bias=arch.mlp_bias)
        self.down_proj = RowParallelLinear(inter, arch.hidden_size, bias=arch.mlp_bias, tp=tp)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP with the residual carried separately (fused add+norm)."""

    def __init__(self, arch: ArchConfig, layer_idx: int, ops: Ops, tp: TPContext,
                 ep: EPContext) -> None:
        super().__init__()
        self.self_attn: nn.Module = MLAttention(arch, layer_idx, ops, tp) \
            if arch.mla is not None else Attention(arch, layer_idx, ops, tp)
        self.mlp: nn.Module = SparseMoeBlock(arch, ops, tp, ep) \
            if arch.moe is not None and layer_idx in arch.moe.layers else MLP(arch, ops, tp)
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
    """Embedding, decoder layers, final norm and LM head (this rank's shard of them)."""

    def __init__(self, arch: ArchConfig, ops: Ops, max_positions: int,
                 tp: TPContext = TPContext(), ep: EPContext = EPContext()) -> None:
        super().__init__()
        self.arch = arch
        self.tp = tp
        self.ep = ep
        # This rank's KV heads: its cache is [blocks, layers, 2, bs, num_local_kv_heads, D].
        self.kv_head_start, self.num_local_kv_heads = kv_head_range(arch.num_kv_heads,
                                                                    tp.size, tp.rank)
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, ops, tp, ep)
                                    for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, ops)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        from hip_kernels.rotary_embedding import make_cos_sin_cache

        rotary_dim = arch.mla.qk_rope_head_dim if arch.mla is not None else arch.head_dim
        self.register_buffer("cos_sin", make_cos_sin_cache(
            max(max_positions, 1), rotary_dim, arch.rope_theta, arch.rope_scaling,
            device=self.embed_tokens.weight.device), persistent=False)
        self.ops = ops

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> final hidden states [T, hidden] (the vendor BLAS the arch's
        config picks for T tokens: hip_kernels/vendor_blas.py)."""
        with self.ops.vendor_blas(input_ids.shape[0]):
            x = self.embed_tokens(input_ids)
            residual: torch.Tensor | None = None
            for layer in self.layers:
                x, residual = layer(x, residual, positions, attn, kv_cache, self.cos_sin)
            assert residual is not None
            x, _ = self.ops.fused_add_rms_norm(x, residual, self.norm.weight, self.norm.eps)
        return x

    def idle_moe_pass(self) -> None:
        """Join every MoE layer's expert exchange with no tokens (an expert-parallel rank's
        dummy step: its peers' tokens may still need its experts)."""
        empty = self.embed_tokens.weight.new_empty((0, self.arch.hidden_size))
        for layer in self.layers:
            if isinstance(layer.mlp, SparseMoeBlock):
                layer.mlp(empty)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Hidden [n, hidden] -> fp32 logits [n, vocab] (the model dtype's values, widened);
        with ``out`` [n, vocab] in the model's dtype, written there instead, unwidened (the
        decode graphs' shared output: the sampler widens only what it needs)."""
        if out is None:
            return self.lm_head(hidden).float()
        return self.lm_head(hidden, out=out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy full Hugging Face-named tensors in, fusing q/k/v and gate/up and keeping this
        rank's shard of each (a routed expert's tensors go to its stack: moe.py). fp8 weights
        and their scales fill fp8 layers and expert stacks (quant.py); where a layer is not
        fp8 they arrive dequantized, where only a linear layer is they are quantized per row.
        Returns loaded names."""
        params = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        fused = self.arch.mla is None

        def keep_fp8(hf_name: str) -> bool:
            name = _map_hf_name(hf_name, fused_qkv=fused)[0]
            return name is None or name not in params or is_fp8(params[name])

        loaded: set[str] = set()
        for hf_name, tensor in dequantize_unkept(weights, keep_fp8):
            name, shard = _map_hf_name(hf_name, fused_qkv=fused)
            if name is None or name not in params:
                continue
            loaded.add(f"{name}:{shard}" if shard else name)
            if shard is not None and shard.startswith("expert"):
                _, which, index = shard.split(":")
                self._moe_block(name).load_expert(name.rsplit(".", 1)[1], which, int(index),
                                                  tensor)
                continue
            target = params[name].data
            offset, size = self._shard_range(target, shard)
            if name.endswith(".weight_scale"):
                tensor = expand_scale_rows(tensor, self._full_rows(name.removesuffix(
                    "_scale"), shard, size))
            part = self._rank_slice(name, shard, tensor)
            if is_fp8(target) and not is_fp8(part):  # a layer the checkpoint left unquantized
                scale = params[name + "_scale"].data
                part, part_scale = quantize_rows(part, scale.shape[1], target.dtype)
                with torch.no_grad():
                    scale[offset:offset + size].copy_(part_scale)
                loaded.add(f"{name}_scale:{shard}" if shard else f"{name}_scale")
            with torch.no_grad():
                target[offset:offset + size].copy_(part.to(target.dtype))
        return loaded

    def _full_rows(self, name: str, shard: str | None, size: int) -> int:
        """Rows of the full checkpoint tensor whose shard fills ``size`` rows here."""
        if shard in ("k", "v"):
            return self.arch.num_kv_heads * self.arch.head_dim
        split = shard in ("q", "gate", "up") or self._mla_head_rows(name)
        return size * self.tp.size if split else size

    def _mla_head_rows(self, weight_name: str) -> bool:
        """Whether ``weight_name`` is one of latent attention's per-head projections."""
        return self.arch.mla is not None and weight_name.endswith(_MLA_HEAD_ROWS)

    def _moe_block(self, name: str) -> SparseMoeBlock:
        """The MoE block of the layer ``name`` belongs to."""
        block = self.layers[int(name.split(".")[1])].mlp
        assert isinstance(block, SparseMoeBlock)
        return block

    def _rank_slice(self, name: str, shard: str | None, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full Hugging Face tensor (``full`` itself without TP).

        q: rows of the local q heads; k/v: rows of the local KV heads (replicated ones too);
        latent attention's q, q_b and kv_b: rows of the local heads (its latent projection is
        replicated);
        gate/up (dense or shared expert): rows of the local intermediate slice;
        o_proj/down_proj: the matching input columns; embed/lm_head: the rank's vocab rows,
        padding rows zero; norms, router: the whole tensor. An fp8 scale (expanded to a row
        per weight row) follows its weight: the same rows, its 128-column blocks of a split K
        (quant.prepare_fp8_ checked they align), or all of a per-tensor one. Routed experts
        slice their own tensors (FusedExperts.load_shard).
        """
        tp, a = self.tp, self.arch
        if tp.size == 1:
            return full
        weight_name = name.removesuffix("_scale")  # an fp8 scale: rows follow its weight's
        d = a.head_dim
        if shard == "q":
            rows = a.num_heads // tp.size * d
            return full.narrow(0, tp.rank * rows, rows)
        if shard in ("k", "v"):
            return full.narrow(0, self.kv_head_start * d, self.num_local_kv_heads * d)
        if shard in ("gate", "up") or self._mla_head_rows(weight_name):
            rows = full.shape[0] // tp.size
            return full.narrow(0, tp.rank * rows, rows)
        if weight_name.endswith(("o_proj.weight", "down_proj.weight")):
            if weight_name != name and full.shape[1] == 1:
                return full  # one scale for all of K
            cols = full.shape[1] // tp.size
            return full.narrow(1, tp.rank * cols, cols)
        if name in ("embed_tokens.weight", "lm_head.weight"):
            per_rank = self.embed_tokens.num_embeddings
            rows_here = full[tp.rank * per_rank:(tp.rank + 1) * per_rank]
            return F.pad(rows_here, (0, 0, 0, per_rank - rows_here.shape[0]))
        return full

    def _shard_range(self, target: torch.Tensor, shard: str | None) -> tuple[int, int]:
        """Row range of a fused tensor (this rank's shard) that a Hugging Face shard fills:
        qkv [q | k | v], gate_up [gate | up] (halves)."""
        a = self.arch
        q, kv = a.num_heads // self.tp.size * a.head_dim, self.num_local_kv_heads * a.head_dim
        half = target.shape[0] // 2
        table = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, half),
                 "up": (half, half)}
        if shard is None:
            return 0, target.shape[0]
        return table[shard]


_MLA_HEAD_ROWS = ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight",
                  "self_attn.kv_b_proj.weight")
"""Latent attention's per-head projections (rows grouped by head), split by TP rank."""

_EXPERT_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down",
                "w1": "gate", "w3": "up", "w2": "down"}


def _map_hf_name(hf_name: str, fused_qkv: bool = True) -> tuple[str | None, str | None]:
    """Hugging Face parameter name -> (our name, fused shard or None). A routed expert's
    tensor maps to its layer's stacked w13/w2 with shard ``expert:gate|up|down:<index>``;
    latent attention (``fused_qkv`` False) keeps the checkpoint's projections as they are.
    An fp8 scale (``x.weight_scale_inv`` or ``x.weight_scale``) maps to ``<x's name>_scale``."""
    weight_name = scale_weight_name(hf_name)
    if weight_name is not None:
        name, shard = _map_hf_name(weight_name, fused_qkv)
        return (None if name is None else f"{name}_scale"), shard
    name = hf_name.removeprefix("model.")
    if "rotary_emb" in name:
        return None, None
    if not fused_qkv and ".self_attn." in name:
        return name, None
    name = name.replace(".block_sparse_moe.", ".mlp.").replace(".shared_experts.",
                                                                ".shared_expert.")
    if ".mlp.experts." in name:  # layers.L.mlp.experts.E.<proj>.weight
        head, rest = name.split(".mlp.experts.", 1)
        index, proj, _ = rest.split(".", 2)
        which = _EXPERT_PROJ.get(proj)
        if which is None or not index.isdigit():
            return None, None
        stacked = "w2" if which == "down" else "w13"
        return f"{head}.mlp.experts.{stacked}", f"expert:{which}:{index}"
    if name.endswith(".mlp.gate.e_score_correction_bias"):
        return name.replace(".mlp.gate.", ".mlp."), None
    if ".mlp.shared_expert." in name:
        for proj, shard in (("gate_proj", "gate"), ("up_proj", "up")):
            if f".shared_expert.{proj}." in name:
                return name.replace(f".{proj}.", ".gate_up_proj."), shard
        return name, None
    for proj, shard in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
        if f"self_attn.{proj}." in name:
            return name.replace(f"self_attn.{proj}.", "self_attn.qkv_proj."), shard
    for proj, shard in (("gate_proj", "gate"), ("up_proj", "up")):
        if f"mlp.{proj}." in name:
            return name.replace(f"mlp.{proj}.", "mlp.gate_up_proj."), shard
    return name, None
