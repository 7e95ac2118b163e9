"""Build a model and fill its weights: builtin (seeded), dummy (random) or safetensors files."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator

import torch

from disagg.common.config import ConfigError, ModelConfig
from disagg.models.arch import ArchConfig, QuantArch, arch_from_hf_dict, load_arch
from disagg.models.builtin import builtin_hf_config, seeded_hf_state_dict
from disagg.models.expert_parallel import EPContext
from disagg.models.llama import LlamaForCausalLM
from disagg.models.ops import Ops
from disagg.models.parallel import TPContext, check_tp, route_skinny
from disagg.models.quant import (
    finalize_fp8_,
    fp8_dtype_for,
    is_fp8,
    prepare_fp8_,
    quantize_model_fp8_,
)

logger = logging.getLogger(__name__)


def resolve_arch(model: str) -> ArchConfig:
    """ArchConfig of ``builtin:*`` or a model directory."""
    if model.startswith("builtin:"):
        try:
            return arch_from_hf_dict(builtin_hf_config(model))
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from exc
    return load_arch(model)


def hf_param_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of every weight of a Llama-family checkpoint (its MoE
    layers named as Qwen-MoE names them; Mixtral's ``block_sparse_moe.experts.E.w1`` load too)."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv, inter = arch.num_heads * d, arch.num_kv_heads * d, arch.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
        if arch.mla is not None:
            shapes.update(_mla_shapes(p + "self_attn.", arch))
        else:
            shapes.update({
                p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)})
        if arch.moe is not None and i in arch.moe.layers:
            shapes.update(_moe_shapes(p + "mlp.", arch))
        else:
            shapes.update(_mlp_shapes(p + "mlp.", h, inter))
            if arch.mlp_bias:
                shapes.update({p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                               p + "mlp.down_proj.bias": (h,)})
        if arch.attention_bias and arch.mla is None:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if arch.o_proj_bias and arch.mla is None:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if arch.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,),
                           p + "self_attn.k_norm.weight": (d,)})
    return shapes


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (inter, hidden),
            prefix + "up_proj.weight": (inter, hidden),
            prefix + "down_proj.weight": (hidden, inter)}


def _mla_shapes(prefix: str, arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    m, h, heads = arch.mla, arch.hidden_size, arch.num_heads
    assert m is not None
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    shapes: dict[str, tuple[int, ...]] = {
        prefix + "kv_a_proj_with_mqa.weight": (m.latent_dim, h),
        prefix + "kv_a_layernorm.weight": (m.kv_lora_rank,),
        prefix + "kv_b_proj.weight": (heads * (m.qk_nope_head_dim + m.v_head_dim),
                                      m.kv_lora_rank),
        prefix + "o_proj.weight": (h, heads * m.v_head_dim)}
    if m.q_lora_rank is None:
        shapes[prefix + "q_proj.weight"] = (heads * qk, h)
    else:
        shapes.update({prefix + "q_a_proj.weight": (m.q_lora_rank, h),
                       prefix + "q_a_layernorm.weight": (m.q_lora_rank,),
                       prefix + "q_b_proj.weight": (heads * qk, m.q_lora_rank)})
    if arch.attention_bias:
        shapes.update({prefix + "kv_a_proj_with_mqa.bias": (m.latent_dim,),
                       prefix + "o_proj.bias": (h,)})
        if m.q_lora_rank is not None:
            shapes[prefix + "q_a_proj.bias"] = (m.q_lora_rank,)
    return shapes


def _moe_shapes(prefix: str, arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    moe, h = arch.moe, arch.hidden_size
    assert moe is not None
    shapes: dict[str, tuple[int, ...]] = {prefix + "gate.weight": (moe.num_experts, h)}
    for e in range(moe.num_experts):
        shapes.update(_mlp_shapes(f"{prefix}experts.{e}.", h, moe.intermediate_size))
    if moe.shared_intermediate_size:
        shapes.update(_mlp_shapes(prefix + "shared_expert.", h, moe.shared_intermediate_size))
    if moe.shared_expert_gate:
        shapes[prefix + "shared_expert_gate.weight"] = (1, h)
    if moe.topk_method == "noaux_tc":
        shapes[prefix + "gate.e_score_correction_bias"] = (moe.num_experts,)
    return shapes


def builtin_state_dict(model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The exact fp32 weights of a builtin model (also used by tests to build the HF twin)."""
    arch = resolve_arch(model)
    return seeded_hf_state_dict(seed, hf_param_shapes(arch))


def _safetensor_weights(model_dir: str):
    """Yield (name, tensor) from every *.safetensors file (sharded checkpoints too)."""
    from safetensors import SafetensorError, safe_open

    files = _shard_files(model_dir)
    if not files:
        raise ConfigError(f"no *.safetensors files in {model_dir!r}; "
                          "use --load-format dummy to run with random weights")
    for path in files:
        try:  # the consumer's own errors never arrive here: only reading the file's
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"cannot read {path!r} (a truncated or corrupt safetensors "
                              f"file?): {exc}") from exc


def _shard_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files: those its ``model.safetensors.index.json`` names
    when it has one (a stray file beside them is not the checkpoint's, as for transformers),
    else every ``*.safetensors``."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if not os.path.exists(index):
        return sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"cannot read {index!r}: {exc}") from None
    if not all(isinstance(n, str) and n and os.path.basename(n) == n for n in names):
        raise ConfigError(f"{index!r} names a shard outside the model directory")
    files = [os.path.join(model_dir, n) for n in names]
    missing = [n for n, f in zip(names, files, strict=True) if not os.path.isfile(f)]
    if missing:
        raise ConfigError(f"{index!r} names shard {missing[0]!r}, which is not there")
    return files


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default floating dtype set to ``dtype`` inside (start-up is single-threaded)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def load_model(cfg: ModelConfig, arch: ArchConfig, ops: Ops, device: torch.device,
               dtype: torch.dtype, max_positions: int,
               tp: TPContext = TPContext(), ep: EPContext = EPContext()) -> LlamaForCausalLM:
    """Instantiate this rank's shard on ``device`` in ``dtype`` and load weights per
    ``cfg.load_format`` (every rank reads the full tensors and keeps its part: its TP slice,
    its EP experts). An fp8 checkpoint loads into fp8 layers; ``--quantization fp8`` (or dummy
    weights for an fp8 config) quantizes the loaded weights instead (disagg/models/quant.py)."""
    check_tp(arch, tp.size)
    if arch.moe is not None:
        ep.expert_range(arch.moe.num_experts)  # a ConfigError unless they split evenly
    torch.manual_seed(cfg.seed)
    with torch.device(device), _default_dtype(dtype):
        # built in ``dtype``: an 8B model built in fp32 then cast held 30 GiB for a moment, past
        # a co-located instance's budget (tensors with their own dtype keep it)
        model = LlamaForCausalLM(arch, ops, max_positions, tp, ep)
    model.to(dtype=dtype)
    model.cos_sin = model.cos_sin.float()  # rotary tables stay fp32
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # routing choices need fp32
            buf.data = buf.data.float()
    builtin = cfg.model.startswith("builtin:")
    fp8_dtype = fp8_dtype_for(device)
    if arch.quant is not None and cfg.load_format != "dummy" and not builtin:
        prepare_fp8_(model, arch.quant)  # an fp8 checkpoint loads into fp8 layers as it is
        _load_checked(model, arch, _safetensor_weights(cfg.model))
        finalize_fp8_(model, ops.fp8_gemm, fp8_dtype)
        logger.info("fp8 weights from the checkpoint (%s scales)", _scales(arch.quant))
        return _finish_load(model, ops)
    if cfg.load_format == "dummy" and not builtin:
        _init_dummy_(model, cfg.seed)
    else:
        _load_checked(model, arch, builtin_state_dict(cfg.model, 0).items() if builtin
                      else _safetensor_weights(cfg.model))
    quant = arch.quant or (QuantArch(method="fp8", weight_block_size=(128, 128))
                           if cfg.quantization == "fp8" else None)
    if quant is not None:
        quantize_model_fp8_(model, quant.weight_block_size, ops.fp8_gemm, fp8_dtype)
        logger.info("fp8 weights quantized at load (%s scales)", _scales(quant))
    return _finish_load(model, ops)


def _finish_load(model: LlamaForCausalLM, ops: Ops) -> LlamaForCausalLM:
    """Eval mode and no parameter asking for gradients: a forward that ran outside inference
    mode by mistake then records no autograd graph either (no activation kept for a backward
    that never comes). Plain linears take the few-rows kernel where the arch's config says."""
    model.requires_grad_(False)
    routed = route_skinny(model, ops.skinny_gemm, ops.skinny_rows)
    if routed:
        logger.info("%d linear layers run skinny_gemm for up to %d rows", routed,
                    ops.skinny_rows)
    return model.eval()


def _scales(quant: QuantArch) -> str:
    return "per-tensor" if quant.weight_block_size is None else "128x128 block"


def _load_checked(model: LlamaForCausalLM, arch: ArchConfig,
                  weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load ``weights``; a ConfigError naming a few of those the checkpoint lacks (the
    scales of fp8 layers included)."""
    shapes = hf_param_shapes(arch)
    loaded = model.load_weights(_shape_checked(weights, shapes))
    fp8 = {name for name, param in model.named_parameters() if is_fp8(param)}
    expected = _expected_loads(arch, shapes)
    for key in list(expected):
        name, sep, shard = key.partition(":")
        if name in fp8:
            expected.add(f"{name}_scale{sep}{shard}")
    missing = expected - loaded
    if missing:
        raise ConfigError(f"checkpoint is missing {len(missing)} weights, e.g. "
                          f"{sorted(missing)[:3]}")


def _shape_checked(weights: Iterable[tuple[str, torch.Tensor]],
                   shapes: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights``, each whose name config.json implies checked for the shape it implies: a
    checkpoint that does not match its config is one ConfigError naming the weight."""
    for name, tensor in weights:
        want = shapes.get(name)
        if want is None and name.endswith(".bias"):
            raise ConfigError(f"checkpoint weight {name} is a bias this model's config.json "
                              "does not build (attention_bias / mlp_bias): ignoring it would "
                              "serve other outputs than the checkpoint's own code")
        if want is not None and tuple(tensor.shape) != want:
            raise ConfigError(f"checkpoint weight {name} has shape {tuple(tensor.shape)} but "
                              f"config.json implies {want}: the config does not match the "
                              "weights")
        yield name, tensor


@torch.no_grad()
def _init_dummy_(model: LlamaForCausalLM, seed: int) -> None:
    """Random weights generated in place on the model's device (fast for 8B-sized models).

    Under tensor parallelism each rank draws its own shards from the same seed, so the shards
    are not slices of one full random model (fine for dummy weights). Replicated weights
    (norms, biases) are constants and agree on every rank.
    """
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif param.dim() == 1:
            param.zero_()
        else:
            std = 1.0 if "embed_tokens" in name else param.shape[-1] ** -0.5  # 1 / sqrt(fan-in)
            param.normal_(0.0, std, generator=gen)


def _expected_loads(arch: ArchConfig,
                    shapes: dict[str, tuple[int, ...]] | None = None) -> set[str]:
    """Names load_weights reports once every weight has arrived (``shapes``: the arch's
    hf_param_shapes, when the caller has them already)."""
    from disagg.models.llama import _map_hf_name

    out = set()
    for hf_name in hf_param_shapes(arch) if shapes is None else shapes:
        name, shard = _map_hf_name(hf_name, fused_qkv=arch.mla is None)
        out.add(f"{name}:{shard}" if shard else str(name))
    return out
