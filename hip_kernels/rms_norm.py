"""RMSNorm, plain and with a fused residual add."""

from __future__ import annotations

import torch

from hip_kernels.launch_config import KernelSpec, bucket, get_int, load_config
from hip_kernels.triton_compat import jit, next_power_of_2, require_triton, tl

KERNEL = "rms_norm"


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> x / rms(x) * weight, computed in fp32, returned in x's dtype."""
    xf = x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps)).to(x.dtype) * weight


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rms_norm(residual'), residual'). Shapes [T, H]."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


@jit
def _normalize_row(x, w_ptr, out_row_ptr, cols, mask, hidden_size, eps,
                   in_dtype: tl.constexpr):
    """Store x * rsqrt(mean(x^2) + eps), rounded to in_dtype as the reference does, * weight."""
    var = tl.sum(x * x, axis=0) / hidden_size
    normed = (x * tl.rsqrt(var + eps)).to(in_dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_row_ptr + cols, (normed * w).to(out_row_ptr.dtype.element_ty), mask=mask)


@jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, hidden_size, stride_x_row, stride_out_row, eps,
                     BLOCK: tl.constexpr):
    """One program per row: the whole row stays in registers (one read, one write)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    _normalize_row(x, w_ptr, out_ptr + row * stride_out_row, cols, mask, hidden_size, eps,
                   x_ptr.dtype.element_ty)


@jit
def _fused_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, hidden_size,
                               stride_x_row, stride_res_row, stride_out_row, eps,
                               BLOCK: tl.constexpr):
    """One program per row: residual' = x + residual (stored), then RMSNorm of residual'."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + row * stride_res_row + cols, mask=mask, other=0.0).to(tl.float32)
    # Round the sum to the residual dtype first: the reference adds in that dtype.
    summed = (x + res).to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * stride_out_row + cols, summed, mask=mask)
    _normalize_row(summed.to(tl.float32), w_ptr, out_ptr + row * stride_out_row, cols, mask,
                   hidden_size, eps, res_out_ptr.dtype.element_ty)


def _plan(hidden_size: int, arch: str | None) -> tuple[int, int]:
    """(BLOCK, num_warps): the whole row in one block, warps bucketed by block size."""
    cfg = load_config(KERNEL, arch)
    block = next_power_of_2(hidden_size)
    if block > get_int(cfg, "max_block"):
        raise ValueError(f"rms_norm: hidden size {hidden_size} is larger than this kernel "
                         f"supports ({get_int(cfg, 'max_block')}); use rms_norm_ref")
    return block, bucket(cfg, "num_warps_by_block", block)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] as a 2-D view [T, H] with a contiguous last dim."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> x / rms(x) * weight, as ``rms_norm_ref`` (output dtype = x op weight).

    fp32 statistics. Rows may be strided. Bytes moved: 2 * T * H * elt + H * w_elt.
    """
    require_triton(KERNEL)
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0] == 0:
        return out
    block, num_warps = _plan(x.shape[-1], None)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x.shape[-1], x2.stride(0), x.shape[-1],
                                     eps, BLOCK=block, num_warps=num_warps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass, as ``fused_add_rms_norm_ref``.

    Shapes [T, H]; both outputs are new tensors. Bytes moved: 4 * T * H * elt + H * w_elt.
    """
    require_triton(KERNEL)
    if x.shape != residual.shape:
        raise ValueError(f"fused_add_rms_norm: x {tuple(x.shape)} and residual "
                         f"{tuple(residual.shape)} differ")
    x2, r2 = _rows(x), _rows(residual)
    res_dtype = torch.promote_types(x.dtype, residual.dtype)
    new_residual = torch.empty(x.shape, dtype=res_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=torch.promote_types(res_dtype, weight.dtype),
                      device=x.device)
    if x2.shape[0] == 0:
        return out, new_residual
    block, num_warps = _plan(x.shape[-1], None)
    _fused_add_rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, new_residual, x.shape[-1], x2.stride(0), r2.stride(0),
        x.shape[-1], eps, BLOCK=block, num_warps=num_warps)
    return out, new_residual


def aot_specs(arch: str) -> list[KernelSpec]:
    """bf16 at Llama-3-8B (4096), Llama-3-70B (8192) and 405B (16384) hidden sizes."""
    specs = []
    for hidden_size in (4096, 8192, 16384):
        block, num_warps = _plan(hidden_size, arch)
        plain = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "hidden_size": "i32",
                 "stride_x_row": "i32", "stride_out_row": "i32", "eps": "fp32",
                 "BLOCK": "constexpr"}
        fused = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
                 "res_out_ptr": "*bf16", "hidden_size": "i32", "stride_x_row": "i32",
                 "stride_res_row": "i32", "stride_out_row": "i32", "eps": "fp32",
                 "BLOCK": "constexpr"}
        aligned = ("hidden_size", "stride_x_row", "stride_res_row", "stride_out_row")
        for name, fn, sig in (("rms_norm", _rms_norm_kernel, plain),
                              ("fused_add_rms_norm", _fused_add_rms_norm_kernel, fused)):
            specs.append(KernelSpec(name=f"{name}[bf16,h{hidden_size}]", fn=fn, signature=sig,
                                    constexprs={"BLOCK": block},
                                    aligned=tuple(a for a in aligned if a in sig),
                                    num_warps=num_warps))
    return specs
