"""Rotary embedding of q and k fused with the cache write of k and v: one launch, not two.

    positions [T], q [T, Hq, D], k/v [T, Hk, D] (strided views of a fused qkv row are fine),
    cos_sin [max_pos, D] fp32, kv_layer [NB, 2, bs, Hk, D], slot_mapping [T]
    -> rotated q [T, Hq, D] (contiguous); rotated k and v written into the token's cache slot

The same as ``rotary_embedding`` then ``reshape_and_cache`` (the reference composes those two
references), and nothing reads the rotated k but the cache. On an H200 the two kernels cost 2.5
and 1.6 us a layer at batch 1, about 130 us of a decode step (bench/results/decode_profile.jsonl);
fused, the step launches 32 kernels fewer and reads k once. Per program (a token and a slice
of its heads): cos/sin read once, its q heads rotated into q_out, its k heads rotated and, like
v, stored at the token's slot: cast to the cache dtype, or for an fp8 cache rounded to k's dtype
first and then scaled and saturated exactly as reshape_and_cache does. A negative slot
(padding) writes nothing.

Bytes moved: T * (2 * Hq + 2 * Hk) * D * elt + 2 * T * Hk * D * (cache elt) + T * D * 4.
"""

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
    subnormal_step,
)
from hip_kernels.launch_config import KernelSpec, get_int, load_config
from hip_kernels.reshape_and_cache import reshape_and_cache_ref
from hip_kernels.rotary_embedding import _rotate_heads, _token_cos_sin, rotary_embedding_ref
from hip_kernels.triton_compat import cdiv, jit, next_power_of_2, require_triton, tl

KERNEL = "rope_and_cache"


def rope_and_cache_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, cos_sin_cache: torch.Tensor, kv_layer: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: float = 1.0,
                       v_scale: float = 1.0) -> torch.Tensor:
    """The definition: ``rotary_embedding_ref`` then ``reshape_and_cache_ref``; returns q."""
    q_rot, k_rot = rotary_embedding_ref(positions, q, k, cos_sin_cache)
    reshape_and_cache_ref(k_rot, v, kv_layer, slot_mapping, k_scale, v_scale)
    return q_rot


@jit
def _rope_and_cache_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, q_out_ptr, kv_ptr,
                           slot_ptr, k_inv_scale, v_inv_scale, num_q_heads, num_kv_heads,
                           stride_q_tok, stride_q_head, stride_k_tok, stride_k_head,
                           stride_v_tok, stride_v_head, stride_cos_sin_pos, stride_kv_block,
                           stride_kv_kv, stride_kv_tok, stride_kv_head, Q_PER, KV_PER,
                           HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                           BLOCK_HEADS: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
                           KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
                           EXACT_CAST: tl.constexpr, SUBNORMAL_STEP: tl.constexpr):
    """Program (token, j): q heads [j * Q_PER, +Q_PER) and K/V heads [j * KV_PER, +KV_PER)."""
    tok = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    dim_mask = offs < HALF
    cos, sin = _token_cos_sin(pos_ptr, tok, cos_sin_ptr, stride_cos_sin_pos, offs, dim_mask,
                              HALF)
    q_lo = part * Q_PER
    _rotate_heads(q_ptr + tok * stride_q_tok + q_lo * stride_q_head,
                  q_out_ptr + (tok * num_q_heads + q_lo) * (2 * HALF),
                  tl.minimum(Q_PER, num_q_heads - q_lo), stride_q_head, cos, sin, offs,
                  dim_mask, HALF, BLOCK_HEADS)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    kv_lo = part * KV_PER
    heads_end = tl.where(slot >= 0, tl.minimum(kv_lo + KV_PER, num_kv_heads), 0)
    slot_row = (kv_ptr + (slot // KV_BLOCK_SIZE) * stride_kv_block
                + (slot % KV_BLOCK_SIZE) * stride_kv_tok)
    k_ty = k_ptr.dtype.element_ty
    cache_ty = kv_ptr.dtype.element_ty
    for head_start in range(kv_lo, kv_lo + KV_PER, BLOCK_HEADS):
        heads = head_start + tl.arange(0, BLOCK_HEADS)
        mask = (heads < heads_end)[:, None] & dim_mask[None, :]
        k_src = k_ptr + tok * stride_k_tok + heads[:, None] * stride_k_head + offs[None, :]
        x1 = tl.load(k_src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(k_src + HALF, mask=mask, other=0.0).to(tl.float32)
        # rounded to k's dtype first, as the unfused path stores the rotated k
        k1 = (x1 * cos - x2 * sin).to(k_ty)
        k2 = (x2 * cos + x1 * sin).to(k_ty)
        v_src = v_ptr + tok * stride_v_tok + heads[:, None] * stride_v_head + offs[None, :]
        v1 = tl.load(v_src, mask=mask, other=0.0)
        v2 = tl.load(v_src + HALF, mask=mask, other=0.0)
        if KV_FP8:
            k1 = quantize_fp8(k1, k_inv_scale, FP8_MAX, EXACT_CAST, SUBNORMAL_STEP)
            k2 = quantize_fp8(k2, k_inv_scale, FP8_MAX, EXACT_CAST, SUBNORMAL_STEP)
            v1 = quantize_fp8(v1, v_inv_scale, FP8_MAX, EXACT_CAST, SUBNORMAL_STEP)
            v2 = quantize_fp8(v2, v_inv_scale, FP8_MAX, EXACT_CAST, SUBNORMAL_STEP)
        dst = slot_row + heads[:, None] * stride_kv_head + offs[None, :]
        tl.store(dst, k1.to(cache_ty), mask=mask)
        tl.store(dst + HALF, k2.to(cache_ty), mask=mask)
        tl.store(dst + stride_kv_kv, v1.to(cache_ty), mask=mask)
        tl.store(dst + stride_kv_kv + HALF, v2.to(cache_ty), mask=mask)


def _plan(head_dim: int, num_q_heads: int, num_kv_heads: int, arch: str | None
          ) -> tuple[int, int, int, int, int]:
    """(BLOCK_HALF, BLOCK_HEADS, num_warps, Q_PER, KV_PER): each token's heads split over
    cdiv(num_q_heads, Q_PER) programs (a batch-1 step is one token: one program would rotate
    all 32 q heads alone), rotating about ``elements_per_step`` values per step."""
    cfg = load_config(KERNEL, arch)
    block_half = next_power_of_2(head_dim // 2)
    q_per = max(1, min(get_int(cfg, "q_heads_per_program"), num_q_heads))
    kv_per = cdiv(num_kv_heads, cdiv(num_q_heads, q_per))
    per_step = max(1, get_int(cfg, "elements_per_step") // block_half)
    block_heads = min(next_power_of_2(max(q_per, kv_per)), next_power_of_2(per_step))
    return block_half, block_heads, get_int(cfg, "num_warps"), q_per, kv_per


def rope_and_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cos_sin_cache: torch.Tensor, kv_layer: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> torch.Tensor:
    """``rope_and_cache_ref`` in one launch; returns the rotated q (contiguous, q's dtype)."""
    require_triton(KERNEL)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if (head_dim % 2 or cos_sin_cache.shape[-1] != head_dim or k.shape[-1] != head_dim
            or v.shape != k.shape or kv_layer.shape[3:] != k.shape[1:]):
        raise ValueError(f"rope_and_cache: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}, cos_sin {tuple(cos_sin_cache.shape)} and kv_layer "
                         f"{tuple(kv_layer.shape)} disagree (even head dim, same K/V heads)")
    if kv_layer.stride(-1) != 1:
        raise ValueError("rope_and_cache: kv_layer's last dim must be contiguous")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cos_sin_cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else \
        cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    block_half, block_heads, num_warps, q_per, kv_per = _plan(head_dim, num_q_heads,
                                                              num_kv_heads, None)
    fp8 = is_fp8(kv_layer.dtype)
    _rope_and_cache_kernel[(num_tokens, cdiv(num_q_heads, q_per))](
        positions, q, k, v, cos_sin_cache, q_out, kv_layer, slot_mapping,
        inverse_scale(k_scale), inverse_scale(v_scale), num_q_heads, num_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2),
        kv_layer.stride(3), q_per, kv_per, HALF=head_dim // 2, BLOCK_HALF=block_half,
        BLOCK_HEADS=block_heads, KV_BLOCK_SIZE=kv_layer.shape[2], KV_FP8=fp8,
        FP8_MAX=fp8_max(kv_layer.dtype) if fp8 else 0.0,
        EXACT_CAST=exact_cast_needed(kv_layer.dtype),
        SUBNORMAL_STEP=subnormal_step(kv_layer.dtype), num_warps=num_warps)
    return q_out


def aot_specs(arch: str) -> list[KernelSpec]:
    """Llama-3-8B (32 q heads, 8 kv heads, head_dim 128, bf16) from a fused qkv row into a
    32-layer cache of block size 16: a bf16 cache and the arch's fp8 one."""
    block_half, block_heads, num_warps, _, _ = _plan(128, 32, 8, arch)
    specs = []
    for fp8 in (False, True):
        dtype = fp8_kv_dtype_for(arch) if fp8 else torch.bfloat16
        cache = f"*{TRITON_FP8[dtype]}" if fp8 else "*bf16"
        sig = {"pos_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16",
               "cos_sin_ptr": "*fp32", "q_out_ptr": "*bf16", "kv_ptr": cache,
               "slot_ptr": "*i64", "k_inv_scale": "fp32", "v_inv_scale": "fp32",
               **{name: "i32" for name in (
                   "num_q_heads", "num_kv_heads", "stride_q_tok", "stride_q_head",
                   "stride_k_tok", "stride_k_head", "stride_v_tok", "stride_v_head",
                   "stride_cos_sin_pos", "stride_kv_block", "stride_kv_kv", "stride_kv_tok",
                   "stride_kv_head", "Q_PER", "KV_PER")}}
        constexprs = {"HALF": 64, "BLOCK_HALF": block_half, "BLOCK_HEADS": block_heads,
                      "KV_BLOCK_SIZE": 16, "KV_FP8": fp8,
                      "FP8_MAX": fp8_max(dtype) if fp8 else 0.0, "EXACT_CAST": False,
                      "SUBNORMAL_STEP": subnormal_step(dtype)}
        sig.update({name: "constexpr" for name in constexprs})
        aligned = tuple(name for name in sig if name.startswith("stride"))
        specs.append(KernelSpec(name=f"{KERNEL}[{'fp8' if fp8 else 'bf16'},q32,kv8,d128,bs16]",
                                fn=_rope_and_cache_kernel, signature=sig,
                                constexprs=constexprs, aligned=aligned, num_warps=num_warps))
    return specs
