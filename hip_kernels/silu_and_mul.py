"""SiLU(gate) * up for the gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hip_kernels.launch_config import KernelSpec, get_int, load_config
from hip_kernels.triton_compat import cdiv, jit, require_triton, tl

KERNEL = "silu_and_mul"


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> silu(gate) * up [T, I]."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


@jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter_size, stride_x_row, stride_out_row,
                         BLOCK: tl.constexpr):
    """One program: BLOCK columns of one row; gate and up are read once, out written once."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter_size
    x_row = x_ptr + row * stride_x_row
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + inter_size + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _plan(inter_size: int, arch: str | None) -> tuple[int, int]:
    """(BLOCK, num_warps) from the arch's config."""
    cfg = load_config(KERNEL, arch)
    return get_int(cfg, "block"), get_int(cfg, "num_warps")


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> silu(gate) * up [..., I] in x's dtype, computed in fp32.

    Rows may be strided (the last dim must be contiguous). Bytes moved: 3 * T * I * elt.
    """
    require_triton(KERNEL)
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim must be even ([gate | up]), got {x.shape[-1]}")
    inter_size = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], inter_size, dtype=x.dtype, device=x.device)
    num_rows = x2.shape[0]
    if num_rows == 0 or inter_size == 0:
        return out
    block, num_warps = _plan(inter_size, None)
    grid = (num_rows, cdiv(inter_size, block))
    _silu_and_mul_kernel[grid](x2, out, inter_size, x2.stride(0), inter_size,
                               BLOCK=block, num_warps=num_warps)
    return out


def aot_specs(arch: str) -> list[KernelSpec]:
    """Compilations checked ahead of time: Llama-3-8B's MLP (I = 14336) in bf16 and fp16."""
    block, num_warps = _plan(14336, arch)
    specs = []
    for dtype in ("bf16", "fp16"):
        sig = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "inter_size": "i32",
               "stride_x_row": "i32", "stride_out_row": "i32", "BLOCK": "constexpr"}
        specs.append(KernelSpec(name=f"{KERNEL}[{dtype}]", fn=_silu_and_mul_kernel,
                                signature=sig, constexprs={"BLOCK": block},
                                aligned=("inter_size", "stride_x_row", "stride_out_row"),
                                num_warps=num_warps))
    return specs
