"""y = x @ W^T (+ b) for a few rows of x: the decode-step linear at batch 1-8, read-bound.

    x  [M, K]  bf16 / fp16 / fp32, M <= MAX_ROWS (any leading dims, flattened)
    W  [N, K]  x's dtype, contiguous along K (nn.Linear's weight)
    b  [N]     optional
    y  [M, N]  x's dtype

At a decode step of a dense 8B model every projection reads its whole weight for one to a few
tokens, so the step is bound by how fast W streams from memory. On an H200 cuBLAS picked a
split-K tile plus a separate reduce for the attention projections (qkv 2.6 TB/s, o_proj 1.8
TB/s against a 4.2 TB/s copy ceiling; bench/results/decode_profile.jsonl). Here each program
owns BLOCK_N output columns over all of K (no split, no reduce launch): it streams its rows of
W in [BLOCK_N, BLOCK_K] tiles, 16-byte loads along K, and keeps a [BLOCK_N, BLOCK_K] fp32
accumulator of elementwise products for one row of x (reduced once after the loop), or, for
2-8 rows, reduces each tile into [BLOCK_M, BLOCK_N]. No tensor cores: a dot would pad M to 16
and the step is bound by the bytes of W anyway.

Which layers use it, per arch (``max_rows`` in hip_kernels/configs/<arch>/skinny_gemm.json; 0
keeps the vendor BLAS): only where it was measured faster, in a CUDA graph over 32 weight copies
as a decode step runs them (bench/linear_bench.py). The tile depends on the output width too:
outputs wider than ``wide_n`` (gate_up, the LM head) take the ``*_wide`` keys. Error against
``skinny_gemm_ref``: accumulation order and the output rounding (the usual per-dtype table).

Bytes moved: N * K * elt (W, once) + M * K * elt per column block (x, from cache) + M * N * elt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hip_kernels.launch_config import KernelSpec, bucket, get_int, load_config
from hip_kernels.triton_compat import cdiv, jit, next_power_of_2, require_triton, tl

KERNEL = "skinny_gemm"
MAX_ROWS = 8
"""Rows the kernel is built for; more go to the vendor BLAS whatever the config says."""


def skinny_gemm_ref(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: fp32 accumulation, rounded to x's dtype."""
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


@jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Program n: y[:, cols] = x @ W[cols, :]^T over the whole of K."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k_mask = ks < K - k_start
            w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptr + k_start + ks, mask=k_mask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
        out = tl.sum(acc, axis=1)[None, :]
    else:
        rows = tl.arange(0, BLOCK_M)
        row_mask = rows < M
        x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
        out = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k_mask = ks < K - k_start
            w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            out += tl.sum(w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :], axis=2)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_rows = tl.arange(0, BLOCK_M)
    y_ptrs = y_ptr + out_rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty),
             mask=(out_rows < M)[:, None] & col_mask[None, :])


@dataclass(frozen=True, slots=True)
class SkinnyPlan:
    """Tile shape and launch options for a row count."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def skinny_plan(num_rows: int, arch: str | None = None, width: int = 0) -> SkinnyPlan:
    """The arch's config for ``num_rows`` (1..MAX_ROWS) rows of x and ``width`` output
    features (over the config's ``wide_n``: the ``*_wide`` tiles)."""
    cfg = load_config(KERNEL, arch)
    wide = "_wide" if width > get_int(cfg, "wide_n") else ""
    sized = {key: bucket(cfg, key + wide, num_rows)
             for key in ("block_n", "block_k", "num_warps", "num_stages")}
    return SkinnyPlan(block_m=next_power_of_2(num_rows), **sized)


def max_rows(arch: str | None = None) -> int:
    """Rows up to which the arch's config routes a plain linear here (0: never)."""
    return min(MAX_ROWS, get_int(load_config(KERNEL, arch), "max_rows"))


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``skinny_gemm_ref`` in one launch for at most MAX_ROWS rows; no host sync."""
    require_triton(KERNEL)
    n, k = weight.shape
    if weight.dim() != 2 or x.shape[-1] != k or weight.stride(-1) != 1 \
            or weight.dtype != x.dtype:
        raise ValueError(f"skinny_gemm: weight must be [N, K] contiguous along K in x's dtype "
                         f"(K = {x.shape[-1]}, {x.dtype}), got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"skinny_gemm: 1..{MAX_ROWS} rows, got {m}")
    plan = skinny_plan(m, width=n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _skinny_gemm_kernel[(cdiv(n, plan.block_n),)](
        x2, weight, weight if bias is None else bias, y, m, n, k, x2.stride(0),
        weight.stride(0), y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, num_warps=plan.num_warps,
        num_stages=plan.num_stages)
    return y.reshape(*x.shape[:-1], n)


AOT_ROWS = (1, 2, 4, 8)
AOT_WIDTHS = (4096, 28672)
"""Llama-3-8B's o_proj/down and gate_up output widths: the narrow and the wide tiles."""


def aot_specs(arch: str) -> list[KernelSpec]:
    """bf16 without bias at each row bucket and tile width of the arch's config."""
    specs: dict[str, KernelSpec] = {}
    for rows in AOT_ROWS:
        for width in AOT_WIDTHS:
            plan = skinny_plan(rows, arch, width)
            sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16",
                   **{name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_wn",
                                               "stride_ym")}}
            constexprs = {"HAS_BIAS": False, "BLOCK_M": plan.block_m,
                          "BLOCK_N": plan.block_n, "BLOCK_K": plan.block_k}
            sig.update({name: "constexpr" for name in constexprs})
            name = (f"{KERNEL}[bf16,m{plan.block_m}n{plan.block_n}k{plan.block_k}"
                    f"w{plan.num_warps}s{plan.num_stages}]")
            specs.setdefault(name, KernelSpec(
                name=name, fn=_skinny_gemm_kernel, signature=sig, constexprs=constexprs,
                aligned=("N", "K", "stride_xm", "stride_wn", "stride_ym"),
                num_warps=plan.num_warps, num_stages=plan.num_stages))
    return list(specs.values())
