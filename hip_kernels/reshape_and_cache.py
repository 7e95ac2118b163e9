"""Write new K/V rows into the paged cache by slot mapping (quantized when the cache is fp8)."""

from __future__ import annotations

import torch

from hip_kernels.kv_fp8 import (
    TRITON_FP8,
    exact_cast_needed,
    fp8_kv_dtype_for,
    fp8_max,
    inverse_scale,
    is_fp8,
    quantize_fp8,
    quantize_ref,
    subnormal_step,
)
from hip_kernels.launch_config import KernelSpec, get_int, load_config
from hip_kernels.triton_compat import cdiv, jit, next_power_of_2, require_triton, tl

KERNEL = "reshape_and_cache"


def reshape_and_cache_ref(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
                          slot_mapping: torch.Tensor, k_scale: float = 1.0,
                          v_scale: float = 1.0) -> None:
    """Scatter key/value [T, Hk, D] into kv_layer [NB, 2, bs, Hk, D] at slot_mapping [T] (int).

    In place. Every slot is valid (0 <= slot < NB * bs). An fp8 cache stores
    saturate(key / k_scale) and saturate(value / v_scale) (hip_kernels/kv_fp8.py); other caches
    ignore the scales. Bytes moved: 2 * T * Hk * D * (elt in + elt of the cache).
    """
    block_size = kv_layer.shape[2]
    slots = slot_mapping.long()
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots % block_size
    kv_layer[blocks, 0, offsets] = quantize_ref(key, k_scale, kv_layer.dtype)
    kv_layer[blocks, 1, offsets] = quantize_ref(value, v_scale, kv_layer.dtype)


@jit
def _reshape_and_cache_kernel(key_ptr, value_ptr, kv_ptr, slot_ptr, k_inv_scale, v_inv_scale,
                              num_kv_heads, stride_key_tok, stride_key_head, stride_value_tok,
                              stride_value_head, stride_kv_block, stride_kv_kv, stride_kv_tok,
                              stride_kv_head, KV_BLOCK_SIZE: tl.constexpr,
                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_HEADS: tl.constexpr, KV_FP8: tl.constexpr,
                              FP8_MAX: tl.constexpr, EXACT_CAST: tl.constexpr,
                              SUBNORMAL_STEP: tl.constexpr):
    """Program (token, head group): copy BLOCK_HEADS heads of K and V into the token's slot
    (KV_FP8: scaled by the inverse scales and saturated first)."""
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_D)
    # A negative slot (a padded token) is skipped rather than written out of bounds.
    num_heads_written = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (heads < num_heads_written)[:, None] & (dims < HEAD_DIM)[None, :]
    dst = (kv_ptr + (slot // KV_BLOCK_SIZE) * stride_kv_block
           + (slot % KV_BLOCK_SIZE) * stride_kv_tok
           + heads[:, None] * stride_kv_head + dims[None, :])
    cache_ty = kv_ptr.dtype.element_ty
    k = tl.load(key_ptr + tok * stride_key_tok + heads[:, None] * stride_key_head + dims[None, :],
                mask=mask, other=0.0)
    if KV_FP8:
        k = quantize_fp8(k, k_inv_scale, FP8_MAX, EXACT_CAST, SUBNORMAL_STEP)
    tl.store(dst, k.to(cache_ty), mask=mask)
    v = tl.load(value_ptr + tok * stride_value_tok + heads[:, None] * stride_value_head
                + dims[None, :], mask=mask, other=0.0)
    if KV_FP8:
        v = quantize_fp8(v, v_inv_scale, FP8_MAX, EXACT_CAST, SUBNORMAL_STEP)
    tl.store(dst + stride_kv_kv, v.to(cache_ty), mask=mask)


def _plan(num_kv_heads: int, head_dim: int, arch: str | None) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_HEADS, num_warps)."""
    cfg = load_config(KERNEL, arch)
    block_d = next_power_of_2(head_dim)
    per_program = max(1, get_int(cfg, "elements_per_program") // block_d)
    block_heads = min(next_power_of_2(num_kv_heads), next_power_of_2(per_program))
    return block_d, block_heads, get_int(cfg, "num_warps")


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> None:
    """Scatter key/value [T, Hk, D] into kv_layer [NB, 2, bs, Hk, D] at slot_mapping [T].

    In place, as ``reshape_and_cache_ref``; kv_layer may be a strided per-layer view of the
    whole cache and key/value strided views of a fused qkv (last dims contiguous). Values are
    cast to the cache dtype; an fp8 cache gets them divided by k_scale / v_scale and saturated.
    The kernel also skips negative slots (padding).
    Bytes moved: 2 * T * Hk * D * (elt in + elt of the cache).
    """
    require_triton(KERNEL)
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or kv_layer.shape[3:] != key.shape[1:]:
        raise ValueError(f"reshape_and_cache: key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)} and kv_layer {tuple(kv_layer.shape)} disagree")
    if kv_layer.stride(-1) != 1:
        raise ValueError("reshape_and_cache: kv_layer's last dim must be contiguous")
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    if num_tokens == 0:
        return
    block_d, block_heads, num_warps = _plan(num_kv_heads, head_dim, None)
    grid = (num_tokens, cdiv(num_kv_heads, block_heads))
    fp8 = is_fp8(kv_layer.dtype)
    _reshape_and_cache_kernel[grid](
        key, value, kv_layer, slot_mapping, inverse_scale(k_scale), inverse_scale(v_scale),
        num_kv_heads, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        KV_BLOCK_SIZE=kv_layer.shape[2], HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_HEADS=block_heads, KV_FP8=fp8, FP8_MAX=fp8_max(kv_layer.dtype) if fp8 else 0.0,
        EXACT_CAST=exact_cast_needed(kv_layer.dtype), SUBNORMAL_STEP=subnormal_step(
            kv_layer.dtype), num_warps=num_warps)


def aot_specs(arch: str) -> list[KernelSpec]:
    """Llama-3-8B K/V (8 kv heads x 128, bf16) into a 32-layer cache, block size 16: a bf16
    cache, and an fp8 one (e4m3fnuz on gfx942, e4m3fn elsewhere)."""
    block_d, block_heads, num_warps = _plan(8, 128, arch)
    specs = []
    for fp8 in (False, True):
        dtype = fp8_kv_dtype_for(arch) if fp8 else torch.bfloat16
        cache = f"*{TRITON_FP8[dtype]}" if fp8 else "*bf16"
        sig = {"key_ptr": "*bf16", "value_ptr": "*bf16", "kv_ptr": cache, "slot_ptr": "*i64",
               "k_inv_scale": "fp32", "v_inv_scale": "fp32", "num_kv_heads": "i32",
               "stride_key_tok": "i32", "stride_key_head": "i32", "stride_value_tok": "i32",
               "stride_value_head": "i32", "stride_kv_block": "i32", "stride_kv_kv": "i32",
               "stride_kv_tok": "i32", "stride_kv_head": "i32"}
        constexprs = {"KV_BLOCK_SIZE": 16, "HEAD_DIM": 128, "BLOCK_D": block_d,
                      "BLOCK_HEADS": block_heads, "KV_FP8": fp8,
                      "FP8_MAX": fp8_max(dtype) if fp8 else 0.0, "EXACT_CAST": False,
                      "SUBNORMAL_STEP": subnormal_step(dtype)}
        sig.update({name: "constexpr" for name in constexprs})
        aligned = tuple(name for name in sig if name.startswith("stride"))
        name = "fp8" if fp8 else "bf16"
        specs.append(KernelSpec(name=f"reshape_and_cache[{name},kv8,d128,bs16]",
                                fn=_reshape_and_cache_kernel, signature=sig,
                                constexprs=constexprs, aligned=aligned, num_warps=num_warps))
    return specs
