"""Rotary position embedding (NeoX / Llama "rotate half" style)."""

from __future__ import annotations

import torch

from hip_kernels.launch_config import KernelSpec, get_int, load_config
from hip_kernels.triton_compat import jit, next_power_of_2, require_triton, tl

KERNEL = "rotary_embedding"


def make_cos_sin_cache(max_positions: int, rotary_dim: int, base: float,
                       scaling: dict | None = None, device: str | torch.device = "cpu"
                       ) -> torch.Tensor:
    """[max_positions, rotary_dim] fp32: first half cos, second half sin (linear, Llama-3 and
    YaRN scaling too; YaRN's attention factor is folded into cos and sin). ``dynamic`` (NTK)
    is the default rope up to its original length, the only lengths the engine runs
    (disagg/models/arch.py check_rope_scaling refuses the rest, and unknown types)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    factor = 1.0
    if scaling and kind == "linear":  # positions divided by the factor
        inv_freq = inv_freq / float(scaling["factor"])
    elif scaling and kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    elif scaling and kind == "yarn":
        inv_freq, factor = _yarn(rotary_dim, base, scaling)
    t = torch.arange(max_positions, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    return (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * factor).float().to(device)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched ``scale`` times."""
    import math

    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, base: float, s: dict) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies (ramp between interpolated and extrapolated ones over the
    dimensions whose wavelength crosses the original context) and the cos/sin factor; in fp32,
    as the checkpoints' reference code computes them."""
    import math

    factor, old_len = float(s["factor"]), float(s["original_max_position_embeddings"])
    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
    attention = s.get("attention_factor")
    if attention is None:
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                     if mscale and mscale_all else yarn_mscale(factor))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq.double(), float(attention)


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama-3.1 frequency scaling, as its config's ``rope_scaling`` describes."""
    import math

    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def rotary_embedding_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] by positions [T]; returns new (q, k).

    cos_sin_cache [max_pos, D] from ``make_cos_sin_cache`` (rotary_dim == head_dim).
    """
    cs = cos_sin_cache[positions.long()]
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rot(q), rot(k)


@jit
def _rotate_heads(src_ptr, dst_ptr, num_heads, stride_src_head, cos, sin, offs, dim_mask,
                  HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr):
    """Rotate every head of one token, BLOCK_HEADS heads at a time; dst is [H, 2 * HALF]."""
    for head_start in range(0, num_heads, BLOCK_HEADS):
        heads = head_start + tl.arange(0, BLOCK_HEADS)
        mask = (heads < num_heads)[:, None] & dim_mask[None, :]
        src = src_ptr + heads[:, None] * stride_src_head + offs[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = dst_ptr + heads[:, None] * (2 * HALF) + offs[None, :]
        out_ty = dst_ptr.dtype.element_ty
        tl.store(dst, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ty), mask=mask)


@jit
def _token_cos_sin(pos_ptr, tok, cos_sin_ptr, stride_cos_sin_pos, offs, dim_mask,
                   HALF: tl.constexpr):
    """cos and sin [1, BLOCK_HALF] (fp32) at token ``tok``'s position."""
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cs_row = cos_sin_ptr + pos * stride_cos_sin_pos
    cos = tl.load(cs_row + offs, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_row + HALF + offs, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@jit
def _rotary_embedding_kernel(pos_ptr, q_ptr, k_ptr, cos_sin_ptr, q_out_ptr, k_out_ptr,
                             num_q_heads, num_kv_heads, stride_q_tok, stride_q_head,
                             stride_k_tok, stride_k_head, stride_cos_sin_pos,
                             HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                             BLOCK_HEADS: tl.constexpr):
    """One program per token: cos/sin read once, then all q heads and all k heads rotated."""
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    dim_mask = offs < HALF
    cos, sin = _token_cos_sin(pos_ptr, tok, cos_sin_ptr, stride_cos_sin_pos, offs, dim_mask,
                              HALF)
    _rotate_heads(q_ptr + tok * stride_q_tok, q_out_ptr + tok * num_q_heads * (2 * HALF),
                  num_q_heads, stride_q_head, cos, sin, offs, dim_mask, HALF, BLOCK_HEADS)
    _rotate_heads(k_ptr + tok * stride_k_tok, k_out_ptr + tok * num_kv_heads * (2 * HALF),
                  num_kv_heads, stride_k_head, cos, sin, offs, dim_mask, HALF, BLOCK_HEADS)


def _plan(head_dim: int, num_heads: int, arch: str | None) -> tuple[int, int, int]:
    """(BLOCK_HALF, BLOCK_HEADS, num_warps): about ``elements_per_step`` values per step."""
    cfg = load_config(KERNEL, arch)
    block_half = next_power_of_2(head_dim // 2)
    per_step = max(1, get_int(cfg, "elements_per_step") // block_half)
    block_heads = min(next_power_of_2(num_heads), next_power_of_2(per_step))
    return block_half, block_heads, get_int(cfg, "num_warps")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] by positions [T]; returns new (q, k).

    cos_sin_cache [max_pos, D] fp32 as ``make_cos_sin_cache`` builds it (rotary_dim == D).
    q and k may be strided views (e.g. slices of a fused qkv); outputs are contiguous, in the
    inputs' dtypes, computed in fp32. Bytes moved: 2 * T * (Hq + Hk) * D * elt + T * D * 4.
    """
    require_triton(KERNEL)
    num_tokens, num_q_heads, head_dim = q.shape
    if head_dim % 2 or cos_sin_cache.shape[-1] != head_dim or k.shape[-1] != head_dim:
        raise ValueError(f"rotary_embedding: head dims q {head_dim}, k {k.shape[-1]} and "
                         f"cos_sin_cache {cos_sin_cache.shape[-1]} must be equal and even")
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos_sin_cache = _last_dim_contiguous(cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    block_half, block_heads, num_warps = _plan(head_dim, max(num_q_heads, k.shape[1]), None)
    _rotary_embedding_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache, q_out, k_out, num_q_heads, k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        HALF=head_dim // 2, BLOCK_HALF=block_half, BLOCK_HEADS=block_heads,
        num_warps=num_warps)
    return q_out, k_out


def aot_specs(arch: str) -> list[KernelSpec]:
    """bf16, head_dim 128, Llama-3-8B heads (32 q, 8 kv) read from a fused qkv row."""
    block_half, block_heads, num_warps = _plan(128, 32, arch)
    sig = {"pos_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "cos_sin_ptr": "*fp32",
           "q_out_ptr": "*bf16", "k_out_ptr": "*bf16", "num_q_heads": "i32",
           "num_kv_heads": "i32", "stride_q_tok": "i32", "stride_q_head": "i32",
           "stride_k_tok": "i32", "stride_k_head": "i32", "stride_cos_sin_pos": "i32",
           "HALF": "constexpr", "BLOCK_HALF": "constexpr", "BLOCK_HEADS": "constexpr"}
    return [KernelSpec(name="rotary_embedding[bf16,d128,q32,kv8]", fn=_rotary_embedding_kernel,
                       signature=sig,
                       constexprs={"HALF": 64, "BLOCK_HALF": block_half,
                                   "BLOCK_HEADS": block_heads},
                       aligned=("num_q_heads", "stride_q_tok", "stride_q_head", "stride_k_tok",
                                "stride_k_head", "stride_cos_sin_pos"),
                       num_warps=num_warps)]
