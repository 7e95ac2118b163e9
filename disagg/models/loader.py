"""Build a model and fill its weights: builtin (seeded), dummy (random) or safetensors files."""

from __future__ import annotations

import glob
import os

import torch

from disagg.common.config import ConfigError, ModelConfig
from disagg.models.arch import ArchConfig, arch_from_hf_dict, load_arch
from disagg.models.builtin import builtin_hf_config, seeded_hf_state_dict
from disagg.models.llama import LlamaForCausalLM
from disagg.models.ops import Ops
from disagg.models.parallel import TPContext, check_tp


def resolve_arch(model: str) -> ArchConfig:
    """ArchConfig of ``builtin:*`` or a model directory."""
    if model.startswith("builtin:"):
        try:
            return arch_from_hf_dict(builtin_hf_config(model))
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from exc
    return load_arch(model)


def hf_param_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face names and shapes of every weight of a Llama-family checkpoint."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv, inter = arch.num_heads * d, arch.num_kv_heads * d, arch.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        if arch.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if arch.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,),
                           p + "self_attn.k_norm.weight": (d,)})
    return shapes


def builtin_state_dict(model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The exact fp32 weights of a builtin model (also used by tests to build the HF twin)."""
    arch = resolve_arch(model)
    return seeded_hf_state_dict(seed, hf_param_shapes(arch))


def _safetensor_weights(model_dir: str):
    """Yield (name, tensor) from every *.safetensors file (sharded checkpoints too)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ConfigError(f"no *.safetensors files in {model_dir!r}; "
                          "use --load-format dummy to run with random weights")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


def load_model(cfg: ModelConfig, arch: ArchConfig, ops: Ops, device: torch.device,
               dtype: torch.dtype, max_positions: int,
               tp: TPContext = TPContext()) -> LlamaForCausalLM:
    """Instantiate this rank's shard on ``device`` in ``dtype`` and load weights per
    ``cfg.load_format`` (every rank reads the full tensors and keeps its part)."""
    check_tp(arch, tp.size)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = LlamaForCausalLM(arch, ops, max_positions, tp)
    model.to(dtype=dtype)
    model.cos_sin = model.cos_sin.float()  # rotary tables stay fp32
    if cfg.load_format == "dummy" and not cfg.model.startswith("builtin:"):
        _init_dummy_(model, cfg.seed)
        return model.eval()
    if cfg.model.startswith("builtin:"):
        weights = builtin_state_dict(cfg.model, 0).items()
    else:
        weights = _safetensor_weights(cfg.model)
    loaded = model.load_weights(weights)
    expected = _expected_loads(arch)
    missing = expected - loaded
    if missing:
        raise ConfigError(f"checkpoint is missing {len(missing)} weights, e.g. "
                          f"{sorted(missing)[:3]}")
    return model.eval()


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
            std = 1.0 if "embed_tokens" in name else param.shape[1] ** -0.5
            param.normal_(0.0, std, generator=gen)


def _expected_loads(arch: ArchConfig) -> set[str]:
    """Names load_weights reports once every weight has arrived."""
    from disagg.models.llama import _map_hf_name

    out = set()
    for hf_name in hf_param_shapes(arch):
        name, shard = _map_hf_name(hf_name)
        out.add(f"{name}:{shard}" if shard else str(name))
    return out
