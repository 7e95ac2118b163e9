"""y = x @ dequant(W)^T with W stored in fp8 (e4m3) and fp32 scales: the FP8-weight linear.

    x     [M, K]  bf16 / fp16 / fp32 (any leading dims, flattened)
    W     [N, K]  float8_e4m3fn, or float8_e4m3fnuz (gfx942 MI300X, see disagg/models/quant.py)
    S     [Sn, Sk] fp32, dequant(W)[n, k] = W[n, k] * S[n // bn, k // bk] with
              Sn = ceil(N / 128): bn = 128     (DeepSeek-V3 ``weight_scale_inv`` blocks)
              Sn = N:             bn = 1       (one scale row per output row)
              Sn = 1:             bn = N       (the same scale for every row)
              Sk = ceil(K / 128): bk = 128     (a scale per 128 input columns)
              Sk = 1:             bk = K       (per-tensor: S of shape [] / [1] / [1, 1])
    y     [M, N]  in x's dtype

    W [N, K] as 128 x 128 blocks, one scale each (Sn = ceil(N/128), Sk = ceil(K/128)):
        k:  0        128       256      K
     n: 0 +--------+--------+----+
          | S[0,0] | S[0,1] |S02 |
      128 +--------+--------+----+
          | S[1,0] | S[1,1] |S12 |
        N +--------+--------+----+

Activations are NOT quantized: each W tile is loaded as fp8, upcast in registers and
multiplied by its column scales (constant along a BLOCK_K <= 128 tile), rounded to x's dtype,
and accumulated by the dot in fp32 (per-tensor / K-unblocked scales: applied once at the end).
Scaling the weight tile, not each K block's partial sum, keeps the accumulator in the matrix
units across the K loop (a partial sum scaled per K block ran at 0.37x the bf16 GEMM on an
H200). So the error against ``fp8_gemm_ref`` is the rounding of W * S to x's dtype (none in
fp32), accumulation order and the output rounding, and the tests hold it to the usual
per-dtype table (tests/hip_kernels/kernel_testing.py: bf16 1.6e-2, fp16 2e-3, fp32 2e-5, atol
and rtol). What fp8 weights cost in accuracy is the quantization itself (3 mantissa bits):
against the matmul of the unquantized weights, 128 x 128 block scales give a relative
Frobenius error ||y_q - y|| / ||y|| below 0.05 on Gaussian weights
(tests/disagg/models/test_quant.py). Upcasting keeps the bf16 MFMA / tensor-core rate, not the
fp8 one: the win is the halved weight bytes, which is what bounds decode. With few rows the
config may split K (``split_k``): each split writes fp32 partials that the launcher sums.

Bytes moved: N * K (weights) + 4 * Sn * Sk (scales) + (M * K + M * N) * elt, with x re-read
once per column block of BLOCK_N and W once per row block of BLOCK_M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hip_kernels.launch_config import KernelSpec, bucket, get_int, load_config
from hip_kernels.triton_compat import cdiv, interpreter_upcasts_dot, jit, require_triton, tl

KERNEL = "fp8_gemm"
SCALE_BLOCK = 128
"""Rows / columns of W one block scale covers (DeepSeek-V3's weight_block_size)."""
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


@dataclass(frozen=True, slots=True)
class ScaleLayout:
    """How S maps onto W: dequant(W)[n, k] = W[n, k] * S[n // rows, k // cols] (shapes only)."""

    rows_per_scale: int
    """1, 128, or N (one scale row for all rows)."""
    k_blocked: bool
    """True: a scale per 128 columns of K; False: one for all of K."""


def scale_layout(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> ScaleLayout:
    """The layout of a ``scale_shape`` scale for a ``weight_shape`` [N, K] fp8 weight."""
    n, k = weight_shape
    if len(scale_shape) < 2:
        if torch.Size(scale_shape).numel() != 1:
            raise ValueError(f"fp8_gemm: a 1-D scale must hold one value, got {scale_shape}")
        return ScaleLayout(max(n, 1), False)
    if len(scale_shape) != 2:
        raise ValueError(f"fp8_gemm: scale must be [Sn, Sk], got {scale_shape}")
    sn, sk = scale_shape
    k_blocks = cdiv(k, SCALE_BLOCK)
    if sk not in (1, k_blocks) or sn not in (1, n, cdiv(n, SCALE_BLOCK)):
        raise ValueError(f"fp8_gemm: scale {tuple(scale_shape)} does not fit weight "
                         f"{tuple(weight_shape)}: expected [1 | N | ceil(N/128), "
                         f"1 | ceil(K/128)]")
    rows = n if sn == 1 else 1 if sn == n else SCALE_BLOCK
    return ScaleLayout(max(rows, 1), sk == k_blocks and sk > 1)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] fp8 with its scale (any layout of ``scale_layout``) -> W * S in ``dtype``."""
    n, k = weight.shape
    layout = scale_layout(tuple(weight.shape), tuple(scale.shape))
    s = scale.reshape(-1, scale.shape[-1] if scale.dim() == 2 else 1).to(torch.float32)
    s = s.repeat_interleave(layout.rows_per_scale, dim=0)[:n]
    if layout.k_blocked:
        s = s.repeat_interleave(SCALE_BLOCK, dim=1)[:, :k]
    return (weight.to(torch.float32) * s).to(dtype)


def fp8_gemm_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
                 ) -> torch.Tensor:
    """Dequantize W to fp32 (fp64 for fp64 x), then x @ W^T; returns [..., N] in x's dtype."""
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    w = dequantize_fp8(weight, weight_scale, acc_dtype)
    return (x.to(acc_dtype) @ w.t()).to(x.dtype)


@jit
def _fp8_gemm_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, stride_sn,
        stride_sk, stride_ys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SCALE_ROWS: tl.constexpr,
        K_BLOCKED: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Program (row block, column block; K split), GROUP_M row blocks sweeping the columns
    together: y[rows, cols] = sum over K tiles of x tile @ (upcast(W tile) * S[cols, k block])^T.

    The block scale is applied to the upcast weight tile (constant along a BLOCK_K <= 128
    tile), so the dot accumulates in place. With SPLIT_K > 1, split s sums its share of the K
    tiles into y + s * stride_ys (fp32 partials the launcher adds up)."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask, col_mask = rows < M, cols < N
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]
    s_ptrs = s_ptr + (cols // SCALE_ROWS) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_first = tl.program_id(1) * k_per_split
    k_end = tl.minimum(K, k_first + k_per_split)
    x_ptrs += k_first
    w_ptrs += k_first
    for k_start in range(k_first, k_end, BLOCK_K):
        k_mask = ks < k_end - k_start
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if K_BLOCKED:
            s = tl.load(s_ptrs + (k_start // 128) * stride_sk, mask=col_mask, other=0.0)
            w = (w.to(tl.float32) * s[None, :]).to(x_ptr.dtype.element_ty)
        else:
            w = w.to(x_ptr.dtype.element_ty)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if not K_BLOCKED:
        acc = acc * tl.load(s_ptrs, mask=col_mask, other=0.0)[None, :]
    y_ptrs = (y_ptr + tl.program_id(1).to(tl.int64) * stride_ys
              + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :])
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@dataclass(frozen=True, slots=True)
class GemmPlan:
    """Tile shape and launch options of one call, bucketed by M (the token count)."""

    block_m: int
    block_n: int
    block_k: int
    """Divides 128, so a K tile never straddles two block scales."""
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    """K splits summed by the launcher (fp32 partials): more programs for decode's few rows."""


def gemm_plan(num_rows: int, arch: str | None = None) -> GemmPlan:
    """The arch's config for ``num_rows`` rows of x."""
    cfg = load_config(KERNEL, arch)
    sized = {key: bucket(cfg, key, num_rows)
             for key in ("block_m", "block_n", "block_k", "num_warps", "num_stages",
                         "split_k")}
    if SCALE_BLOCK % sized["block_k"]:
        raise ValueError(f"fp8_gemm: block_k {sized['block_k']} must divide {SCALE_BLOCK}")
    return GemmPlan(group_m=get_int(cfg, "group_m"), **sized)


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
             ) -> torch.Tensor:
    """``fp8_gemm_ref`` in one launch: x [..., K] -> [..., N] in x's dtype (see the module
    docstring for the scale layouts and the tolerance). No host sync (graph-capturable)."""
    require_triton(KERNEL)
    if weight.dtype not in FP8_DTYPES or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_gemm: weight must be fp8 [N, K] with K = x's last dim "
                         f"({x.shape[-1]}), got {weight.dtype} {tuple(weight.shape)}")
    if weight.stride(-1) != 1:
        raise ValueError("fp8_gemm: the weight must be contiguous along K")
    n, k = weight.shape
    layout = scale_layout((n, k), tuple(weight_scale.shape))
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    scale = weight_scale.reshape(-1, weight_scale.shape[-1] if weight_scale.dim() == 2 else 1)
    if scale.dtype != torch.float32:
        scale = scale.float()
    stride_sn = 0 if scale.shape[0] == 1 else scale.stride(0)
    plan = gemm_plan(m)
    split = max(1, min(plan.split_k, cdiv(k, plan.block_k)))
    # split K: fp32 partials [split, M, N], summed below (still no host sync)
    out = torch.empty(split, m, n, dtype=torch.float32 if split > 1 else x.dtype,
                      device=x.device)
    grid = (cdiv(m, plan.block_m) * cdiv(n, plan.block_n), split)
    _fp8_gemm_kernel[grid](
        x2, weight, scale, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(1),
        stride_sn, scale.stride(1), out.stride(0), BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, GROUP_M=plan.group_m,
        SCALE_ROWS=1 if stride_sn == 0 else layout.rows_per_scale, K_BLOCKED=layout.k_blocked,
        SPLIT_K=split, UPCAST_DOT=interpreter_upcasts_dot(x.dtype), num_warps=plan.num_warps,
        num_stages=plan.num_stages)
    y = out[0] if split == 1 else out.sum(0).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


AOT_ROWS = (1, 64, 256, 4096)
"""Token counts compiled ahead of time: decode, small batch, prefill chunk, long prefill
(one per block_m bucket of the default config)."""
_TRITON_FP8 = {"gfx942": "fp8e4b8", "gfx950": "fp8e4nv", "sm_90": "fp8e4nv",
               "default": "fp8e4nv"}
"""The fp8 weight type each arch runs (e4m3fnuz on MI300X, OCP e4m3fn elsewhere)."""


def triton_fp8(arch: str) -> str:
    """Triton's name of the fp8 weight type ``arch`` runs (an AOT signature's pointer type)."""
    return _TRITON_FP8.get(arch, "fp8e4nv")


_INTS = ("M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "stride_sn", "stride_sk",
         "stride_ys")


def _spec(arch: str, plan: GemmPlan, scales: str) -> KernelSpec:
    """One bf16 compilation: ``scales`` is block (128 x 128) or tensor (per-tensor)."""
    fp8 = triton_fp8(arch)
    block = scales == "block"
    sig = {"x_ptr": "*bf16", "w_ptr": f"*{fp8}", "s_ptr": "*fp32", "y_ptr": "*bf16",
           **{name: "i32" for name in _INTS}}
    constexprs = {"BLOCK_M": plan.block_m, "BLOCK_N": plan.block_n, "BLOCK_K": plan.block_k,
                  "GROUP_M": plan.group_m, "SCALE_ROWS": SCALE_BLOCK if block else 1,
                  "K_BLOCKED": block, "SPLIT_K": plan.split_k, "UPCAST_DOT": False}
    sig.update({name: "constexpr" for name in constexprs})
    tile = (f"m{plan.block_m}n{plan.block_n}k{plan.block_k}w{plan.num_warps}s{plan.num_stages}"
            f"split{plan.split_k}")
    return KernelSpec(name=f"{KERNEL}[bf16,{fp8},{scales},{tile}]", fn=_fp8_gemm_kernel,
                      signature=sig, constexprs=constexprs,
                      aligned=("N", "K", "stride_xm", "stride_wn", "stride_ym"),
                      num_warps=plan.num_warps, num_stages=plan.num_stages)


def aot_specs(arch: str) -> list[KernelSpec]:
    """bf16 activations with the arch's fp8 weights, block and per-tensor scales, at each
    distinct tile plan over AOT_ROWS."""
    specs: dict[str, KernelSpec] = {}
    for rows in AOT_ROWS:
        plan = gemm_plan(rows, arch)
        for scales in ("block", "tensor"):
            spec = _spec(arch, plan, scales)
            specs.setdefault(spec.name, spec)
    return list(specs.values())
