"""fp8 KV cache elements: per-tensor scaled e4m3, shared by the cache writer and every reader.

    write (reshape_and_cache):  stored = fp8(clamp(x * (1 / scale), -FP8_MAX, FP8_MAX))
    read  (attention kernels):  x ~= float(stored) * scale

One fp32 scale per layer for K and one for V (the engine's ``KVCacheSpec``,
disagg/engine/kv_quant.py); the kernels take them as plain float arguments and fold them where
they cost nothing: k_scale into the softmax scale (q . (k s) = s (q . k)) and v_scale into the
output (sum p (v s) = s sum p v). A cache that is not fp8 ignores the scales.

Dtypes: ``float8_e4m3fn`` (OCP, max 448; Triton ``fp8e4nv``) and ``float8_e4m3fnuz`` (MI300's
gfx94x, max 240; Triton ``fp8e4b8``). The cast saturates: out of range is the max, never NaN.
"""

from __future__ import annotations

import torch

from hip_kernels.triton_compat import jit, tl

FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
TRITON_FP8 = {torch.float8_e4m3fn: "fp8e4nv", torch.float8_e4m3fnuz: "fp8e4b8"}
"""Triton's name of each fp8 cache dtype (AOT signatures: ``*fp8e4nv``)."""
_SUBNORMAL_STEP = {torch.float8_e4m3fn: 2.0 ** -9, torch.float8_e4m3fnuz: 2.0 ** -10}
"""Spacing of the smallest (subnormal) fp8 values: min normal 2^-6 (fn) / 2^-7 (fnuz), 3
mantissa bits."""


def is_fp8(dtype: torch.dtype) -> bool:
    """True for the fp8 KV cache dtypes."""
    return dtype in FP8_KV_DTYPES


def fp8_kv_dtype_for(arch: str) -> torch.dtype:
    """The fp8 cache dtype of a config arch (``gfx942`` -> e4m3fnuz; gfx950, sm_90 -> e4m3fn),
    as disagg.common.platform.fp8_dtype picks it on the running GPU."""
    return torch.float8_e4m3fnuz if arch.startswith("gfx94") else torch.float8_e4m3fn


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an fp8 cache dtype (448 or 240)."""
    return float(torch.finfo(dtype).max)


def quantize_ref(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x (any float dtype) -> ``dtype``; for fp8, saturated x * (1 / scale) in fp32."""
    if not is_fp8(dtype):
        return x.to(dtype)
    top = fp8_max(dtype)
    return (x.float() * inverse_scale(scale)).clamp_(-top, top).to(dtype)


def dequantize_ref(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cached x -> ``dtype``; fp8 values are multiplied by their scale (in fp32) first."""
    if not is_fp8(x.dtype):
        return x.to(dtype)
    return (x.float() * scale).to(dtype)


def inverse_scale(scale: float) -> float:
    """The writer's multiplier 1 / scale, rounded to fp32 as the Triton kernel receives it."""
    return float(torch.tensor(1.0 / scale, dtype=torch.float32))


def exact_cast_needed(dtype: torch.dtype) -> bool:
    """Whether the kernel must round to fp8 itself before the cast (interpreter only).

    Triton 3.9's interpreter casts fp32 -> fp8 by truncating the mantissa and adding the cut-off
    bit without a carry: 31.97 becomes 16, not 32. Rounded first (RTNE, as torch and the
    hardware do), every value is exactly representable and its cast exact. Compiled kernels
    use the hardware conversion.
    """
    from disagg.common import envs

    return is_fp8(dtype) and envs.triton_interpret()


def subnormal_step(dtype: torch.dtype) -> float:
    """Spacing of the fp8 subnormals (a constexpr of the writer's exact-cast path)."""
    return _SUBNORMAL_STEP.get(dtype, 0.0)


@jit
def quantize_fp8(x, inv_scale, FP8_MAX: tl.constexpr, EXACT_CAST: tl.constexpr,
                 SUBNORMAL_STEP: tl.constexpr):
    """fp32 x * inv_scale saturated to +-FP8_MAX; rounded to fp8's grid (RTNE) when the cast
    itself cannot be trusted to (EXACT_CAST, the interpreter). Returns fp32: cast it."""
    y = tl.clamp(x.to(tl.float32) * inv_scale, -FP8_MAX, FP8_MAX)
    if EXACT_CAST:
        # normal range: keep 3 mantissa bits, round half to even
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
        rounded = bits.to(tl.float32, bitcast=True)
        # subnormal range: multiples of SUBNORMAL_STEP (fp32 add rounds half to even), the
        # sign kept (a negative value that rounds to zero is -0, as the hardware makes it)
        magic = SUBNORMAL_STEP * 12582912.0  # 1.5 * 2^23 steps: the sum's ulp is one step
        tiny = (tl.abs(y) + magic) - magic
        tiny = tl.where((bits >> 31) == 1, -tiny, tiny)
        y = tl.where(tl.abs(y) < SUBNORMAL_STEP * 8.0, tiny, rounded)
    return y
