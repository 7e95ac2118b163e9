"""What the KV cache's bytes mean: its element dtype and, for fp8, the per-layer scales.

    --kv-cache-dtype auto       elements in the model's dtype; no scales
    --kv-cache-dtype fp8        e4m3 (float8_e4m3fn; float8_e4m3fnuz on MI300's gfx94x):
                     fp8_e4m3   stored = saturate(x / scale), read = stored * scale

Scale granularity: per tensor, one fp32 scale for K and one for V in every layer (vLLM's
scheme for a checkpoint without per-head calibration). A latent-attention (MLA) layer caches
one latent, so both its halves use the layer's k_scale. The scales come from the checkpoint
(``model.layers.N.self_attn.k_scale`` / ``.v_scale``, or ``.kv_scale`` for both), else 1.0.

Where they live: here, in the cache's metadata (``KVCacheSpec``), not inside the blocks. They
are constants of an instance, set at load and never changed, so a block's bytes mean the same
values wherever the scales agree; the P/D handshake (connectors/pd_metadata.py) advertises the
dtype and every scale and refuses a peer whose differ. The attention modules read their
layer's pair from plain attributes (``k_scale``, ``v_scale``) that ``apply_kv_scales`` sets.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass

import torch

from disagg.common import platform
from disagg.common.config import KV_CACHE_DTYPES, ConfigError
from disagg.models.arch import ArchConfig

logger = logging.getLogger(__name__)

_SCALE_NAME = re.compile(
    r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:attn\.)?(k_scale|v_scale|kv_scale)$")
"""``model.layers.N.self_attn.k_scale`` (also ``...self_attn.attn.k_scale``, ``kv_scale``)."""


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """The cache's element type and fp8 scales (one K and one V scale per layer)."""

    name: str
    """The --kv-cache-dtype value, normalised: ``auto`` or ``fp8_e4m3``."""
    dtype: torch.dtype
    """Element dtype of the cache tensor."""
    k_scales: tuple[float, ...]
    """Per layer: stored K = K / k_scale (fp8 only; 1.0 otherwise)."""
    v_scales: tuple[float, ...]
    """Per layer: stored V = V / v_scale (an MLA layer's latent uses k_scale for both)."""

    @property
    def quantized(self) -> bool:
        """True when the cache holds fp8 values that need their scales."""
        return self.name != "auto"

    @property
    def dtype_name(self) -> str:
        """``float8_e4m3fn``, ``bfloat16``, ...: what the handshake and /metrics report."""
        return str(self.dtype).removeprefix("torch.")

    def scales(self) -> list[float]:
        """[k_0, v_0, k_1, v_1, ...] for the handshake; [] when the cache is not fp8."""
        if not self.quantized:
            return []
        return [s for pair in zip(self.k_scales, self.v_scales, strict=True) for s in pair]

    def describe(self) -> str:
        """One phrase for messages: ``float8_e4m3fn (--kv-cache-dtype fp8_e4m3, ...)``."""
        if not self.quantized:
            return f"{self.dtype_name} (--kv-cache-dtype auto)"
        return f"{self.dtype_name} (--kv-cache-dtype {self.name}, {describe_scales(self.scales())})"


def describe_scales(scales: list[float]) -> str:
    """Per-layer scales in a few words: ``scales k=v=1.0`` or their ranges."""
    if not scales:
        return "no scales"
    ks, vs = scales[0::2], scales[1::2]
    if len(set(scales)) == 1:
        return f"scales k=v={scales[0]:g} in every layer"
    return (f"scales k {min(ks):g}..{max(ks):g}, v {min(vs):g}..{max(vs):g} over "
            f"{len(ks)} layers")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> tuple[str, torch.dtype]:
    """(normalised name, cache dtype): auto keeps the model's; fp8 is this platform's e4m3."""
    if name not in KV_CACHE_DTYPES:
        raise ConfigError(f"--kv-cache-dtype {name!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    if name == "auto":
        return "auto", model_dtype
    return "fp8_e4m3", platform.fp8_dtype()


def kv_cache_spec(name: str, model_dtype: torch.dtype, arch: ArchConfig,
                  model: str) -> KVCacheSpec:
    """The cache spec of an engine: dtype from the flag, scales from the checkpoint (fp8)."""
    name, dtype = resolve_kv_cache_dtype(name, model_dtype)
    ones = (1.0,) * arch.num_layers
    if name == "auto":
        return KVCacheSpec(name, dtype, ones, ones)
    found = read_checkpoint_scales(model, arch.num_layers)
    if found is None:
        logger.warning("fp8 KV cache without k_scale/v_scale in the checkpoint: every scale is "
                       "1.0 (values beyond +-%g saturate)", torch.finfo(dtype).max)
        return KVCacheSpec(name, dtype, ones, ones)
    k_scales, v_scales = found
    if arch.mla is not None:
        v_scales = k_scales  # one latent per layer: one scale
    return KVCacheSpec(name, dtype, k_scales, v_scales)


def read_checkpoint_scales(model: str, num_layers: int
                           ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Per-layer (k, v) scales from a checkpoint's safetensors, or None when it has none.
    Layers without their own scale keep 1.0; ``kv_scale`` sets both."""
    files = [] if model.startswith("builtin:") else \
        sorted(glob.glob(os.path.join(model, "*.safetensors")))
    k, v = [1.0] * num_layers, [1.0] * num_layers
    seen = False
    for path in files:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                m = _SCALE_NAME.search(key)
                if m is None or int(m.group(1)) >= num_layers:
                    continue
                value = float(f.get_tensor(key).float().reshape(-1).max())
                if not value > 0:
                    raise ConfigError(f"checkpoint scale {key} is {value}: KV scales must be "
                                      "positive")
                layer, kind = int(m.group(1)), m.group(2)
                if kind in ("k_scale", "kv_scale"):
                    k[layer] = value
                if kind in ("v_scale", "kv_scale"):
                    v[layer] = value
                seen = True
    return (tuple(k), tuple(v)) if seen else None


def apply_kv_scales(model: torch.nn.Module, spec: KVCacheSpec) -> None:
    """Give each layer's attention module its (k_scale, v_scale); the kernels use them only
    when the cache is fp8."""
    layers = getattr(model, "layers", [])
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        attn.k_scale, attn.v_scale = spec.k_scales[i], spec.v_scales[i]
