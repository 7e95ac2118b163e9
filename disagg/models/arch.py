"""Architecture hyper-parameters read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from disagg.common.config import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe",
                         "qwen3_moe", "deepseek_v2", "deepseek_v3")
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True, slots=True, kw_only=True)
class MLAArch:
    """Multi-head latent attention (DeepSeek-V2/V3): K and V of every head are up-projected
    from one per-token latent, so the cache holds that latent (kv_lora_rank) and the shared
    rotary key (qk_rope_head_dim), nothing per head. disagg/models/mla.py."""

    q_lora_rank: int | None
    """Queries through a low-rank bottleneck (None: one q_proj)."""
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    """Rotary pairs are (x0, x1), (x2, x3)... (DeepSeek's layout) rather than halves."""
    softmax_scale: float
    """1 / sqrt(qk head dim), times YaRN's mscale^2 when the checkpoint stretches context."""

    @property
    def latent_dim(self) -> int:
        """Elements cached per token per layer (576 on DeepSeek-V2/V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True, slots=True, kw_only=True)
class MoEArch:
    """A mixture-of-experts MLP: which layers have it, how tokens pick experts, the experts.

    Routing (disagg/models/moe.py select_experts), per family:
      mixtral, qwen2_moe, qwen3_moe: softmax over experts, top-k, renormalized when
        ``renormalize`` (Mixtral always, Qwen per ``norm_topk_prob``);
      deepseek_v2: softmax, top-k within the ``topk_group`` best of ``n_group`` groups (group
        score = its best expert) when ``topk_method`` is group_limited_greedy;
      deepseek_v3 (noaux_tc): sigmoid, choice by score + ``e_score_correction_bias`` within the
        best groups (group score = sum of its top-2), weights = the uncorrected scores;
    then weights x ``routed_scaling_factor``.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    """Of one routed expert."""
    scoring: str
    """softmax | sigmoid"""
    topk_method: str
    """greedy | group_limited_greedy | noaux_tc"""
    renormalize: bool
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    shared_intermediate_size: int = 0
    """Of the always-on shared expert(s), 0 without (DeepSeek: n_shared_experts x expert)."""
    shared_expert_gate: bool = False
    """Qwen2-MoE scales the shared expert by sigmoid(x . w)."""
    layers: tuple[int, ...] = ()
    """Indices of the layers whose MLP is the MoE block (the others are dense)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantArch:
    """The checkpoint's ``quantization_config``: fp8 (e4m3) weights with fp32 scales (see
    disagg/models/quant.py)."""

    method: str
    """fp8 (the only one supported)."""
    weight_block_size: tuple[int, int] | None
    """(128, 128): DeepSeek-V3-style block scales (``*.weight_scale_inv``); None: one scale
    per tensor (``*.weight_scale``)."""
    activation_scheme: str = "dynamic"
    """dynamic | static; activations are not quantized here, so it changes nothing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchConfig:
    """What the Llama-family model code needs to build layers."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    """Biases on the q/k/v projections (Qwen2 always; Llama and Qwen3 per
    ``attention_bias``; latent attention's own projections, disagg/models/mla.py)."""
    qk_norm: bool
    """Qwen3 normalizes q and k per head before rotary."""
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    moe: MoEArch | None = None
    """The MoE MLP of the layers in ``moe.layers``; None: every layer is dense."""
    mla: MLAArch | None = None
    """Latent attention; then the cache has one "KV head" whose K and V halves hold the two
    halves of the latent (``head_dim`` = half the latent, rounded up), so a block is exactly
    layers x block_size x latent (plus one pad element when the latent is odd)."""
    quant: QuantArch | None = None
    """The checkpoint's weight quantization; None: weights in a float dtype."""
    o_proj_bias: bool = False
    """A bias on o_proj too (Llama, Qwen3 and Qwen3-MoE with ``attention_bias``)."""
    mlp_bias: bool = False
    """Biases on gate/up/down of the dense MLP (Llama's ``mlp_bias``)."""
    sliding_window: int | None = None
    """Tokens a query attends back over in the layers that use sliding-window attention
    (Mistral-7B-v0.1: 4096); None: full attention everywhere. Not implemented: a context
    longer than it is refused (check_sliding_window)."""

    @property
    def kv_bytes_per_token_per_elt(self) -> int:
        """Elements of K and V per token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def arch_from_hf_dict(cfg: dict[str, Any]) -> ArchConfig:
    """Build from a parsed config.json; unsupported architectures are a clear error."""
    model_type = cfg.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    heads, hidden = _int(cfg, "num_attention_heads"), _int(cfg, "hidden_size")
    if heads < 1 or hidden < 1:
        raise ConfigError("config.json num_attention_heads and hidden_size must be positive")
    if not cfg.get("head_dim") and hidden % heads and model_type != "qwen3":
        raise ConfigError(f"config.json has no head_dim and hidden_size {hidden} is not a "
                          f"multiple of num_attention_heads {heads}")
    # transformers' Qwen3 config defaults head_dim to 128, not hidden // heads
    head_dim = cfg.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads)
    rope_params = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling") or (rope_params if "rope_type" in rope_params
                                                and rope_params["rope_type"] != "default"
                                                else None)
    max_positions = int(cfg.get("max_position_embeddings", 2048))
    check_rope_scaling(rope_scaling, max_positions)
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
            "llama3", "yarn") and rope_scaling.get("original_max_position_embeddings") is None:
        # transformers takes max_position_embeddings for the original length then
        rope_scaling = {**rope_scaling, "original_max_position_embeddings": max_positions}
    check_activation(cfg)
    mla = mla_arch_from_hf_dict(cfg, rope_scaling)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if kv_heads < 1 or heads % kv_heads:
        raise ConfigError(f"config.json num_attention_heads {heads} is not a multiple of "
                          f"num_key_value_heads {kv_heads}")
    if mla is not None:  # the latent's halves stand in for one K head and one V head
        kv_heads, head_dim = 1, -(-mla.latent_dim // 2)
    qkv_bias, o_bias = _attention_biases(cfg, model_type)
    return ArchConfig(
        model_type=model_type,
        vocab_size=_int(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size"),
        num_layers=_int(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_proj_bias=o_bias,
        mlp_bias=model_type == "llama" and bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        moe=moe_arch_from_hf_dict(cfg),
        mla=mla,
        quant=quant_arch_from_hf_dict(cfg),
        sliding_window=sliding_window_from_hf_dict(cfg),
    )


def _attention_biases(cfg: dict[str, Any], model_type: str) -> tuple[bool, bool]:
    """(q/k/v biases, o_proj bias) as each family's Hugging Face code builds them: Qwen2
    always has q/k/v ones, Qwen2-MoE per ``qkv_bias``; Llama, Qwen3 and Qwen3-MoE put
    ``attention_bias`` on all four; Mistral and Mixtral have none whatever the config says;
    DeepSeek's ``attention_bias`` is latent attention's (disagg/models/mla.py)."""
    flag = bool(cfg.get("attention_bias", False))
    if model_type == "qwen2":
        return True, False
    if model_type == "qwen2_moe":
        return bool(cfg.get("qkv_bias", True)), False
    if model_type in ("llama", "qwen3", "qwen3_moe"):
        return flag, flag
    if model_type in MLA_MODEL_TYPES:
        return flag, False
    return False, False


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
"""rope_scaling types the rotary tables implement (hip_kernels/rotary_embedding.py)."""


def check_rope_scaling(scaling: dict[str, Any] | None, max_positions: int) -> None:
    """A ConfigError for a rope_scaling the rotary tables do not implement. ``dynamic``
    (NTK) changes the frequencies only past its original length; the engine never runs past
    max_position_embeddings, so it is the default rope unless the original length is
    shorter."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError("config.json rope_scaling must be an object or null")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    if kind != "default" and kind != "dynamic" and not isinstance(
            scaling.get("factor"), int | float):
        raise ConfigError(f"rope_scaling {kind} needs a numeric factor")
    original = scaling.get("original_max_position_embeddings")
    if kind == "dynamic" and isinstance(original, int) and original < max_positions:
        raise ConfigError(f"rope_scaling dynamic with original_max_position_embeddings "
                          f"{original} < max_position_embeddings {max_positions} is not "
                          "supported (dynamic NTK scaling past the original length)")


def check_activation(cfg: dict[str, Any]) -> None:
    """Every supported family gates its MLP with SiLU; another ``hidden_act`` is refused
    rather than run as SiLU."""
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"hidden_act {act!r} is not supported (supported: silu)")


def sliding_window_from_hf_dict(cfg: dict[str, Any]) -> int | None:
    """The attention window a config.json turns on; None when every layer attends fully.
    Qwen2/3 carry ``sliding_window`` with ``use_sliding_window: false`` (off); newer configs
    name each layer's kind in ``layer_types``."""
    window = cfg.get("sliding_window")
    if window is None or not cfg.get("use_sliding_window", True):
        return None
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and "sliding_attention" not in layer_types:
        return None
    first_windowed = cfg.get("max_window_layers")  # Qwen2: layers from this index on
    if isinstance(first_windowed, int) and first_windowed >= int(cfg.get("num_hidden_layers", 0)):
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"config.json sliding_window must be a positive integer or null, "
                          f"got {window!r}")
    return window


def check_sliding_window(arch: ArchConfig, max_model_len: int) -> None:
    """Refuse a context longer than the model's attention window: past it, full attention
    (all this engine has) would differ from the model's. Up to it the two are the same."""
    window = arch.sliding_window
    if window is not None and max_model_len > window:
        raise ConfigError(f"this {arch.model_type} model uses sliding-window attention "
                          f"(sliding_window={window} in config.json), which disagg does not "
                          f"support yet; serve it with --max-model-len {window} or less "
                          f"(attention is then identical), not {max_model_len}")


def quant_arch_from_hf_dict(cfg: dict[str, Any]) -> QuantArch | None:
    """The ``quantization_config`` of a config.json; None without one. Anything but fp8 e4m3
    with per-tensor or 128 x 128 block scales is a ConfigError."""
    q = cfg.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError("config.json quantization_config must be an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization_config quant_method {method!r} is not supported "
                          "(supported: fp8)")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"fp8 format {q['fmt']!r} is not supported (supported: e4m3)")
    block = q.get("weight_block_size")
    if block is not None and list(block) != [128, 128]:
        raise ConfigError(f"fp8 weight_block_size {block} is not supported (supported: "
                          "[128, 128], or none for per-tensor scales)")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ConfigError(f"fp8 activation_scheme {scheme!r} is not supported "
                          "(supported: dynamic, static)")
    return QuantArch(method=method, weight_block_size=(128, 128) if block else None,
                     activation_scheme=scheme)


def mla_arch_from_hf_dict(cfg: dict[str, Any],
                          rope_scaling: dict[str, Any] | None) -> MLAArch | None:
    """The latent attention of a DeepSeek-V2/V3 config.json; None for other models."""
    if cfg.get("model_type") not in MLA_MODEL_TYPES:
        return None
    nope, rope = _int(cfg, "qk_nope_head_dim"), _int(cfg, "qk_rope_head_dim")
    scale = (nope + rope) ** -0.5
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "yarn":
        from hip_kernels.rotary_embedding import yarn_mscale

        mscale_all = rope_scaling.get("mscale_all_dim") or 0
        if mscale_all:
            scale *= yarn_mscale(float(rope_scaling["factor"]), mscale_all) ** 2
    q_lora = cfg.get("q_lora_rank")
    mla = MLAArch(q_lora_rank=int(q_lora) if q_lora else None,
                  kv_lora_rank=_int(cfg, "kv_lora_rank"), qk_nope_head_dim=nope,
                  qk_rope_head_dim=rope, v_head_dim=_int(cfg, "v_head_dim"),
                  rope_interleave=bool(cfg.get("rope_interleave", True)),
                  softmax_scale=scale)
    if min(mla.kv_lora_rank, nope, rope, mla.v_head_dim) < 1 or rope % 2:
        raise ConfigError("kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim (even) and "
                          "v_head_dim must be positive")
    return mla


def _int(cfg: dict[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        if cfg.get(key) is not None:
            return int(cfg[key])
    if default is None:
        raise ConfigError(f"config.json lacks {keys[0]!r}")
    return default


def moe_arch_from_hf_dict(cfg: dict[str, Any]) -> MoEArch | None:
    """The MoE part of a config.json (Hugging Face's defaults where a key is absent); None for
    a dense model. Bad values are a ConfigError naming the key."""
    model_type = cfg.get("model_type", "")
    num_layers = int(cfg.get("num_hidden_layers", 0))
    if model_type == "mixtral":
        moe = MoEArch(num_experts=_int(cfg, "num_local_experts", default=8),
                      top_k=_int(cfg, "num_experts_per_tok", default=2),
                      intermediate_size=_int(cfg, "intermediate_size"), scoring="softmax",
                      topk_method="greedy", renormalize=True, layers=tuple(range(num_layers)))
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        step = _int(cfg, "decoder_sparse_step", default=1)
        dense = set(cfg.get("mlp_only_layers") or ())
        experts = _int(cfg, "num_experts", "num_local_experts")
        shared = _int(cfg, "shared_expert_intermediate_size", default=0) \
            if model_type == "qwen2_moe" else 0
        moe = MoEArch(num_experts=experts, top_k=_int(cfg, "num_experts_per_tok"),
                      intermediate_size=_int(cfg, "moe_intermediate_size"), scoring="softmax",
                      topk_method="greedy", renormalize=bool(cfg.get("norm_topk_prob", False)),
                      shared_intermediate_size=shared, shared_expert_gate=shared > 0,
                      layers=tuple(i for i in range(num_layers)
                                   if experts > 0 and step > 0 and (i + 1) % step == 0
                                   and i not in dense))
    elif model_type in MLA_MODEL_TYPES:
        v3 = model_type == "deepseek_v3"
        expert = _int(cfg, "moe_intermediate_size")
        first_dense = _int(cfg, "first_k_dense_replace", default=3 if v3 else 0)
        freq = _int(cfg, "moe_layer_freq", default=1)
        scoring = cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax")
        method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        if v3 and (scoring, method) != ("sigmoid", "noaux_tc"):
            # DeepSeek-V3's code implements only these; transformers ignores the keys
            raise ConfigError(f"deepseek_v3 with scoring_func {scoring!r} and topk_method "
                              f"{method!r} is not supported (DeepSeek-V3 routes with sigmoid "
                              "and noaux_tc)")
        moe = MoEArch(num_experts=_int(cfg, "n_routed_experts", "num_local_experts"),
                      top_k=_int(cfg, "num_experts_per_tok"), intermediate_size=expert,
                      scoring=scoring, topk_method=method,
                      # DeepSeek-V2's code renormalizes only for k > 1; V3's always
                      renormalize=bool(cfg.get("norm_topk_prob", v3)) and (
                          v3 or _int(cfg, "num_experts_per_tok") > 1),
                      routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
                      n_group=_int(cfg, "n_group", default=1),
                      topk_group=_int(cfg, "topk_group", default=1),
                      shared_intermediate_size=expert * _int(cfg, "n_shared_experts", default=0),
                      layers=tuple(i for i in range(num_layers)
                                   if i >= first_dense and freq > 0 and i % freq == 0))
    else:
        return None
    _check_moe(moe)
    return moe


def _check_moe(moe: MoEArch) -> None:
    if moe.num_experts < 1 or not 1 <= moe.top_k <= moe.num_experts:
        raise ConfigError(f"num_experts_per_tok {moe.top_k} must be in 1..num_experts "
                          f"({moe.num_experts})")
    if moe.intermediate_size < 1:
        raise ConfigError("moe_intermediate_size must be positive")
    if moe.scoring not in ("softmax", "sigmoid"):
        raise ConfigError(f"scoring_func {moe.scoring!r} is not supported (softmax, sigmoid)")
    if moe.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ConfigError(f"topk_method {moe.topk_method!r} is not supported "
                          "(greedy, group_limited_greedy, noaux_tc)")
    grouped = moe.topk_method != "greedy"
    if grouped and (moe.n_group < 1 or moe.num_experts % moe.n_group
                    or not 1 <= moe.topk_group <= moe.n_group
                    or moe.top_k > moe.topk_group * (moe.num_experts // moe.n_group)):
        raise ConfigError(f"n_group {moe.n_group} / topk_group {moe.topk_group} do not fit "
                          f"{moe.num_experts} experts and top-{moe.top_k} routing")


def load_arch(model_dir: str) -> ArchConfig:
    """Read ``model_dir/config.json``."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{model_dir!r} is not a model directory (no config.json); "
                          "use builtin:tiny-llama or a Hugging Face model directory")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return arch_from_hf_dict(cfg)
