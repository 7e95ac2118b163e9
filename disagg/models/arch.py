"""Architecture hyper-parameters read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from disagg.common.config import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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
    """Qwen2 has biases on q/k/v projections."""
    qk_norm: bool
    """Qwen3 normalizes q and k per head before rotary."""
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None

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
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim") or hidden // heads
    rope_params = cfg.get("rope_parameters") or {}
    return ArchConfig(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
        rope_scaling=cfg.get("rope_scaling") or (rope_params if "rope_type" in rope_params
                                                 and rope_params["rope_type"] != "default"
                                                 else None),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type == "qwen3",
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )


def load_arch(model_dir: str) -> ArchConfig:
    """Read ``model_dir/config.json``."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{model_dir!r} is not a model directory (no config.json); "
                          "use builtin:tiny-llama or a Hugging Face model directory")
    with open(path) as f:
        return arch_from_hf_dict(json.load(f))
