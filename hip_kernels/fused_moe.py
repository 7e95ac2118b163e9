"""Fused mixture-of-experts MLP: a grouped GEMM over expert-sorted tiles of (token, k) pairs.

Pair p = t * K + k routes token t to expert topk_ids[t, k]. ``moe_align`` (its own module, with
the tile picture) sorts the pairs by expert into ``MoeTiles``: BLOCK_M-row tiles of one expert
each, every expert's run padded to a multiple of BLOCK_M, the pairs whose expert is not on this
rank dropped. Four launches:

    launch 1, align (hip_kernels.moe_align), one program per chunk of <= 64 pairs; past the
    config's align_max_pairs the torch moe_align_ref, about 30 launches, instead:
        topk_ids -> sorted_pair_ids, tile_expert_ids, num_tokens_post_padded
    launch 2, gate_up, program (tile, column block n):
        inter[p, n] = silu(x[p // K] . w13[e, n]) * (x[p // K] . w13[e, I + n])
    launch 3, down, program (tile, column block n):
        y[p, n] = topk_weights[p] * (inter[p] . w2[e, n])        (dropped pairs: never written)
    launch 4, combine, program (token block, column block n):
        out[t, n] = sum over k with a valid id of y[t * K + k, n]    (fp32, k in order)

Padding rows hold the pair id ``num_pairs`` and are masked; tiles past the used rows carry the
expert id E and exit at once. Everything is sized from shapes (no host sync, so a CUDA graph
can capture it), nothing is zero-filled (the combine reads only valid pairs' rows), and no
atomics are used: the output is deterministic. The combine stays a launch of its own because
folding it into the down kernel needs a "last program for this token sums it" handshake
between programs, which Triton cannot make safe on AMD when a program has several waves (the
barrier around its atomics does not drain the other waves' global stores).

FP8 weights (``w13_scale`` and ``w2_scale`` given): w13 and w2 hold e4m3fn (e4m3fnuz on gfx942)
values and fp32 scales [E, Sn, Sk] say what they mean, per expert as hip_kernels/fp8_gemm.py
reads a weight [N, K]: dequant(w[e])[n, k] = w[e, n, k] * scale[e, n // bn, k // bk] with

    Sn = ceil(N / 128): bn = 128 (DeepSeek-V3 blocks)     Sn = 1: one scale row for all N rows
    Sk = ceil(K / 128): bk = 128                           Sk = 1: one scale for all of K
    w13 [E, 2I, H] (N = 2I, K = H)      w2 [E, H, I] (N = H, K = I)

    w13[e] rows:  0          128              I            I + 128             2I
                  | gate blk 0 | gate blk 1 ... | up blk I/128 | up blk I/128+1 ... |

    gate column n reads scale row n // 128 and up column n row (I + n) // 128. With 128-row
    blocks (Sn > 1) I must be a multiple of 128, else a block would hold gate and up rows
    (ValueError); one scale row per expert (Sn = 1) fits any I.

The GEMM kernels then load fp8 tiles and upcast them in registers to x's dtype (exact: every
e4m3 value is a bf16, fp16 and fp32 value). BLOCK_K and BLOCK_N divide 128, so a program's
columns share one scale row and each K tile one scale column: the scale is one scalar per tile.
With K blocks (Sk > 1) each tile is scaled as it is upcast, w * s rounded once to x's dtype
(bf16: 2^-9 relative, far below fp8's own 2^-4), so the dot accumulates in place as in
hip_kernels/fp8_gemm.py; scaling each tile's partial sum instead is exact but needs a second
accumulator (on gfx942 up to 64 more VGPRs in the AOT figures, 177 instead of 128 registers
on sm_90 prefill; fp8_gemm measured that form at 0.37x the bf16 GEMM on an H200 prefill).
With Sk = 1 the sum is scaled once, exactly, after the loop. Activations are not quantized:
against the reference (which dequantizes, then runs the same math) only rounding differs.
The bf16 path is its own compilation (W_FP8 False), unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from hip_kernels.fp8_gemm import FP8_DTYPES, SCALE_BLOCK, dequantize_fp8, triton_fp8
from hip_kernels.launch_config import KernelSpec, bucket, get_int, load_config
from hip_kernels.moe_align import MoeTiles, align_spec, moe_align, moe_align_ref
from hip_kernels.triton_compat import (
    cdiv,
    interpreter_upcasts_dot,
    jit,
    next_power_of_2,
    require_triton,
    tl,
)

KERNEL = "fused_moe"


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = id.

    x [T, H]; w13 [E, 2I, H] = [gate | up] rows; w2 [E, H, I]; topk_weights [T, K] fp32;
    topk_ids [T, K] int, ids outside [0, E) contribute nothing. fp8 w13 / w2 come with their
    scales [E, Sn, Sk] (module docstring) and are dequantized first. Computed in fp32 (fp64
    for fp64 inputs), one batched matmul pair per expert present. Returns [T, H] in x's dtype.
    """
    _check_scales(w13, w2, w13_scale, w2_scale)
    num_experts, inter_size = w13.shape[0], w2.shape[2]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
    ids = topk_ids.long()
    for expert in torch.unique(ids[(ids >= 0) & (ids < num_experts)]).tolist():
        tokens, slots = torch.nonzero(ids == expert, as_tuple=True)
        gate_up = x[tokens].to(acc_dtype) @ _expert_weight(w13, w13_scale, expert,
                                                            acc_dtype).t()
        h = F.silu(gate_up[:, :inter_size]) * gate_up[:, inter_size:]
        y = h @ _expert_weight(w2, w2_scale, expert, acc_dtype).t()
        out.index_add_(0, tokens, y * topk_weights[tokens, slots, None].to(acc_dtype))
    return out.to(x.dtype)


def _expert_weight(weight: torch.Tensor, scale: torch.Tensor | None, expert: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """One expert's [N, K] weight in ``dtype``, dequantized when it is fp8."""
    if scale is None:
        return weight[expert].to(dtype)
    return dequantize_fp8(weight[expert], scale[expert], dtype)


def _check_scales(w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None,
                  w2_scale: torch.Tensor | None) -> bool:
    """Whether the weights are fp8; raise ValueError unless both scales are absent or both
    fit fp8 weights in a layout of the module docstring."""
    if w13_scale is None and w2_scale is None:
        return False
    if w13_scale is None or w2_scale is None:
        raise ValueError("fused_moe: give both w13_scale and w2_scale, or neither")
    if w13.dtype not in FP8_DTYPES or w2.dtype not in FP8_DTYPES:
        raise ValueError(f"fused_moe: weights with scales must be fp8 (e4m3fn or e4m3fnuz), "
                         f"got {w13.dtype}/{w2.dtype}")
    for name, weight, scale in (("w13", w13, w13_scale), ("w2", w2, w2_scale)):
        experts, n, k = weight.shape
        if scale.dim() != 3 or scale.shape[0] != experts \
                or scale.shape[1] not in (1, cdiv(n, SCALE_BLOCK)) \
                or scale.shape[2] not in (1, cdiv(k, SCALE_BLOCK)):
            raise ValueError(f"fused_moe: {name}_scale {tuple(scale.shape)} does not fit "
                             f"{name} {tuple(weight.shape)}: expected [E, 1 | ceil(N/128), "
                             "1 | ceil(K/128)]")
    inter_size = w2.shape[2]
    if w13_scale.shape[1] > 1 and inter_size % SCALE_BLOCK:
        raise ValueError(f"fused_moe: 128-row block scales of w13 need I % 128 == 0 (a block "
                         f"would hold gate and up rows), got I = {inter_size}")
    return True


@jit
def _tile_coords(num_col_blocks, GROUP_M: tl.constexpr):
    """(row tile, column block) of this program; GROUP_M row tiles sweep the columns together.

    Consecutive programs then share GROUP_M tiles' rows and one expert's weight columns in L2.
    """
    pid = tl.program_id(0)
    num_row_tiles = tl.num_programs(0) // num_col_blocks
    programs_per_group = GROUP_M * num_col_blocks
    first_tile = (pid // programs_per_group) * GROUP_M
    group_size = tl.minimum(num_row_tiles - first_tile, GROUP_M)
    in_group = pid % programs_per_group
    return first_tile + in_group % group_size, in_group // group_size


@jit
def _tile_pairs(sorted_pair_ids_ptr, tile, num_pairs, BLOCK_M: tl.constexpr):
    """The tile's pair ids (int64) and which of its rows are real (not padding)."""
    pairs = tl.load(sorted_pair_ids_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    return pairs.to(tl.int64), pairs < num_pairs


@jit
def _dot_step(a, w_ptrs, w_mask, acc, UPCAST_DOT: tl.constexpr):
    """acc + a @ w for one BLOCK_K slice; w [BLOCK_K, BLOCK_N] is loaded here."""
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    if UPCAST_DOT:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(a, w, acc, input_precision="ieee")


@jit
def _fp8_dot_step(a, w_ptrs, w_mask, s_ptr, acc, K_BLOCKED: tl.constexpr,
                  UPCAST_DOT: tl.constexpr):
    """acc + a @ upcast(w) for one BLOCK_K slice of fp8 w; when K is blocked the upcast tile
    is scaled by the scale at ``s_ptr`` first (else the caller scales the whole sum once)."""
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    if K_BLOCKED:
        w = (w.to(tl.float32) * tl.load(s_ptr)).to(a.dtype)
    else:
        w = w.to(a.dtype)
    if UPCAST_DOT:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(a, w, acc, input_precision="ieee")


@jit
def _fused_moe_gate_up_kernel(
        x_ptr, w13_ptr, s13_ptr, inter_ptr, sorted_pair_ids_ptr, tile_expert_ids_ptr,
        num_pairs, top_k, num_experts, hidden_size, inter_size, stride_x_tok,
        stride_w13_expert, stride_w13_row, scale_stride_expert, scale_stride_row,
        scale_stride_k, stride_inter_pair, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST_DOT: tl.constexpr,
        W_FP8: tl.constexpr, K_BLOCKED: tl.constexpr):
    """Program (tile, n block): inter[p, n] = silu(x[t] . gate[e, n]) * (x[t] . up[e, n]);
    W_FP8: w13 is fp8 and s13 its scales, per K tile one for the gate columns (row n // 128)
    and one for the up columns (row (I + n) // 128): BLOCK_N divides 128."""
    tile, col_block = _tile_coords(tl.cdiv(inter_size, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ids_ptr + tile)
    if expert >= num_experts:
        return
    pairs, row_mask = _tile_pairs(sorted_pair_ids_ptr, tile, num_pairs, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < inter_size
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + (pairs // top_k)[:, None] * stride_x_tok + ks[None, :]
    w_expert = w13_ptr + expert.to(tl.int64) * stride_w13_expert + ks[:, None]
    gate_ptrs = w_expert + cols.to(tl.int64)[None, :] * stride_w13_row
    up_ptrs = w_expert + (cols + inter_size).to(tl.int64)[None, :] * stride_w13_row
    if W_FP8:
        s_expert = s13_ptr + expert.to(tl.int64) * scale_stride_expert
        gate_s_ptr = s_expert + (col_block * BLOCK_N // 128) * scale_stride_row
        up_s_ptr = s_expert + ((col_block * BLOCK_N + inter_size) // 128) * scale_stride_row
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, hidden_size, BLOCK_K):
        k_mask = ks < hidden_size - k_start
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        if W_FP8:
            k_block = (k_start // 128) * scale_stride_k
            acc_gate = _fp8_dot_step(a, gate_ptrs, w_mask, gate_s_ptr + k_block, acc_gate,
                                     K_BLOCKED, UPCAST_DOT)
            acc_up = _fp8_dot_step(a, up_ptrs, w_mask, up_s_ptr + k_block, acc_up, K_BLOCKED,
                                   UPCAST_DOT)
        else:
            acc_gate = _dot_step(a, gate_ptrs, w_mask, acc_gate, UPCAST_DOT)
            acc_up = _dot_step(a, up_ptrs, w_mask, acc_up, UPCAST_DOT)
        a_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    if W_FP8 and not K_BLOCKED:
        acc_gate *= tl.load(gate_s_ptr)
        acc_up *= tl.load(up_s_ptr)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_ptrs = inter_ptr + pairs[:, None] * stride_inter_pair + cols[None, :]
    tl.store(out_ptrs, h.to(inter_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@jit
def _fused_moe_down_kernel(
        inter_ptr, w2_ptr, s2_ptr, y_ptr, topk_weights_ptr, sorted_pair_ids_ptr,
        tile_expert_ids_ptr, num_pairs, num_experts, hidden_size, inter_size,
        stride_inter_pair, stride_w2_expert, stride_w2_row, scale_stride_expert,
        scale_stride_row, scale_stride_k, stride_y_pair, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        UPCAST_DOT: tl.constexpr, W_FP8: tl.constexpr, K_BLOCKED: tl.constexpr):
    """Program (tile, n block): y[p, n] = topk_weights[p] * (inter[p] . w2[e, n]);
    W_FP8: w2 is fp8 and s2 its scales, one per K tile (row n // 128: BLOCK_N divides 128)."""
    tile, col_block = _tile_coords(tl.cdiv(hidden_size, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ids_ptr + tile)
    if expert >= num_experts:
        return
    pairs, row_mask = _tile_pairs(sorted_pair_ids_ptr, tile, num_pairs, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden_size
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + pairs[:, None] * stride_inter_pair + ks[None, :]
    w_ptrs = (w2_ptr + expert.to(tl.int64) * stride_w2_expert
              + cols.to(tl.int64)[None, :] * stride_w2_row + ks[:, None])
    if W_FP8:
        s_ptr = (s2_ptr + expert.to(tl.int64) * scale_stride_expert
                 + (col_block * BLOCK_N // 128) * scale_stride_row)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, inter_size, BLOCK_K):
        k_mask = ks < inter_size - k_start
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        if W_FP8:
            acc = _fp8_dot_step(a, w_ptrs, w_mask, s_ptr + (k_start // 128) * scale_stride_k,
                                acc, K_BLOCKED, UPCAST_DOT)
        else:
            acc = _dot_step(a, w_ptrs, w_mask, acc, UPCAST_DOT)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if W_FP8 and not K_BLOCKED:
        acc *= tl.load(s_ptr)
    weights = tl.load(topk_weights_ptr + pairs, mask=row_mask, other=0.0)
    y = acc * weights[:, None]
    out_ptrs = y_ptr + pairs[:, None] * stride_y_pair + cols[None, :]
    tl.store(out_ptrs, y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@jit
def _fused_moe_combine_kernel(
        y_ptr, topk_ids_ptr, out_ptr, num_tokens, top_k, num_experts, hidden_size,
        stride_y_pair, stride_ids_tok, stride_ids_k, stride_out_tok, BLOCK_T: tl.constexpr,
        K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (token block, column block): out[t, n] = sum_k y[t * K + k, n] over the k
    whose id is in [0, E), in fp32; a token with no such k gets zeros. All K rows are loaded
    at once (one round trip, not K)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.arange(0, K_PAD)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tok_mask = tokens < num_tokens
    pair_mask = tok_mask[:, None] & (ks < top_k)[None, :]
    ids = tl.load(topk_ids_ptr + tokens[:, None] * stride_ids_tok + ks[None, :] * stride_ids_k,
                  mask=pair_mask, other=-1)
    valid = pair_mask & (ids >= 0) & (ids < num_experts)
    rows = tokens.to(tl.int64)[:, None] * top_k + ks[None, :]
    y_ptrs = y_ptr + rows[:, :, None] * stride_y_pair + cols[None, None, :]
    y = tl.load(y_ptrs, mask=valid[:, :, None] & (cols < hidden_size)[None, None, :], other=0.0)
    out = tl.sum(y.to(tl.float32), axis=1)
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_out_tok + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty),
             mask=tok_mask[:, None] & (cols < hidden_size)[None, :])


@dataclass(frozen=True, slots=True)
class MoePlan:
    """Launch options of one call: the align path, the GEMM tile shape, the combine block."""

    block_m: int
    """Rows per tile; each expert's run of pairs is padded to a multiple of it."""
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    triton_align: bool
    """Align in one Triton launch (``moe_align``); False past align_max_pairs (torch)."""
    combine_block_h: int
    """Columns per combine program."""


def moe_plan(num_pairs: int, num_experts: int, arch: str | None = None) -> MoePlan:
    """The config's plan, bucketed by the expected rows per expert, cdiv(T * K, E)."""
    cfg = load_config(KERNEL, arch)
    rows = cdiv(num_pairs, num_experts)
    sized = {key: bucket(cfg, key, rows)
             for key in ("block_m", "block_n", "block_k", "num_warps", "num_stages")}
    return MoePlan(group_m=get_int(cfg, "group_m"),
                   triton_align=num_pairs <= get_int(cfg, "align_max_pairs"),
                   combine_block_h=get_int(cfg, "combine_block_h"), **sized)


def _check_shapes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """Raise ValueError unless the shapes and weight layouts are what the kernels read."""
    num_experts, two_inter, hidden = w13.shape
    if x.dim() != 2 or x.shape[1] != hidden or two_inter % 2:
        raise ValueError(f"fused_moe: x {tuple(x.shape)} and w13 {tuple(w13.shape)} do not "
                         "match [T, H] and [E, 2I, H]")
    if tuple(w2.shape) != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"fused_moe: w2 {tuple(w2.shape)} is not [E, H, I] = "
                         f"{(num_experts, hidden, two_inter // 2)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or \
            topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused_moe: topk_weights {tuple(topk_weights.shape)} and topk_ids "
                         f"{tuple(topk_ids.shape)} must both be [T, K] with T = {x.shape[0]}")
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("fused_moe: w13 and w2 must be contiguous along their last dim")


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE MLP of ``fused_moe_ref`` in four launches; returns [T, H] in x's dtype.

    Same shapes, id masking and fp8 scale layouts as the reference; fp32 accumulation, the
    [T*K, I] intermediate and the per-pair outputs rounded to x's dtype, their sum over k in
    fp32. No host sync, no atomics (deterministic). fp32 contiguous topk_weights and any int
    topk_ids cost no extra launch. Bytes moved (at least): A * 3 * I * H * w_elt for the A
    distinct experts used (w_elt 1 for fp8, plus their 4-byte scales), plus 2 * T * H * elt;
    the intermediates add 2 * T * K * (I + H) * elt.
    """
    require_triton(KERNEL)
    _check_shapes(x, w13, w2, topk_weights, topk_ids)
    if not _check_scales(w13, w2, w13_scale, w2_scale) and \
            (w13.dtype != x.dtype or w2.dtype != x.dtype):
        raise ValueError(f"fused_moe: weights {w13.dtype}/{w2.dtype} must be x's {x.dtype} "
                         "(or fp8 with scales)")
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return torch.empty_like(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_experts = w13.shape[0]
    plan = moe_plan(num_tokens * top_k, num_experts)
    align = moe_align if plan.triton_align else moe_align_ref
    tiles = align(topk_ids, num_experts, plan.block_m)
    inter = _gate_up(x, w13, _fp8_args(w13_scale, plan), tiles, top_k, plan)
    y = _down(inter, w2, _fp8_args(w2_scale, plan),
              topk_weights.to(torch.float32).reshape(-1).contiguous(), tiles, plan)
    return _combine(y, topk_ids, num_experts, plan)


class _Fp8Args(NamedTuple):
    """A GEMM kernel's scale operands: ``scale`` None and zeros for weights in x's dtype."""

    scale: torch.Tensor | None
    stride_expert: int
    stride_row: int
    """0 when one scale row serves every weight row (Sn = 1)."""
    stride_k: int
    k_blocked: bool
    """A scale per 128 columns of K (Sk > 1): each BLOCK_K weight tile is scaled."""

    def kernel_args(self) -> dict[str, Any]:
        """The kernel's keyword arguments for these operands."""
        return {"scale_stride_expert": self.stride_expert, "scale_stride_row": self.stride_row,
                "scale_stride_k": self.stride_k, "W_FP8": self.scale is not None,
                "K_BLOCKED": self.k_blocked}


def _fp8_args(scale: torch.Tensor | None, plan: MoePlan) -> _Fp8Args:
    """The scale operands of one weight (checked by ``_check_scales``)."""
    if scale is None:
        return _Fp8Args(None, 0, 0, 0, False)
    scale = scale if scale.dtype == torch.float32 else scale.float()
    k_blocked = scale.shape[2] > 1
    if (k_blocked and SCALE_BLOCK % plan.block_k) or \
            (scale.shape[1] > 1 and SCALE_BLOCK % plan.block_n):
        raise ValueError(f"fused_moe: block_k {plan.block_k} and block_n {plan.block_n} must "
                         f"divide {SCALE_BLOCK} for fp8 block scales")
    return _Fp8Args(scale, scale.stride(0), 0 if scale.shape[1] == 1 else scale.stride(1),
                    scale.stride(2) if k_blocked else 0, k_blocked)


def _gate_up(x: torch.Tensor, w13: torch.Tensor, fp8: _Fp8Args, tiles: MoeTiles, top_k: int,
             plan: MoePlan) -> torch.Tensor:
    """Kernel 1: silu(gate) * up of every pair, [T * K, I] in x's dtype."""
    num_pairs, inter_size = x.shape[0] * top_k, w13.shape[1] // 2
    inter = torch.empty(num_pairs, inter_size, dtype=x.dtype, device=x.device)
    grid = (tiles.tile_expert_ids.numel() * cdiv(inter_size, plan.block_n),)
    _fused_moe_gate_up_kernel[grid](
        x, w13, fp8.scale, inter, tiles.sorted_pair_ids, tiles.tile_expert_ids, num_pairs,
        top_k, w13.shape[0], x.shape[1], inter_size, x.stride(0), w13.stride(0), w13.stride(1),
        stride_inter_pair=inter.stride(0), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k, GROUP_M=plan.group_m,
        UPCAST_DOT=interpreter_upcasts_dot(x.dtype), num_warps=plan.num_warps,
        num_stages=plan.num_stages, **fp8.kernel_args())
    return inter


def _down(inter: torch.Tensor, w2: torch.Tensor, fp8: _Fp8Args, pair_weights: torch.Tensor,
          tiles: MoeTiles, plan: MoePlan) -> torch.Tensor:
    """Kernel 2: weighted down projection of every valid pair, [T * K, H]; the rows of
    dropped pairs are left unwritten (the combine never reads them)."""
    num_pairs, inter_size = inter.shape
    hidden = w2.shape[1]
    y = torch.empty(num_pairs, hidden, dtype=inter.dtype, device=inter.device)
    grid = (tiles.tile_expert_ids.numel() * cdiv(hidden, plan.block_n),)
    _fused_moe_down_kernel[grid](
        inter, w2, fp8.scale, y, pair_weights, tiles.sorted_pair_ids, tiles.tile_expert_ids,
        num_pairs, w2.shape[0], hidden, inter_size, inter.stride(0), w2.stride(0),
        w2.stride(1), stride_y_pair=y.stride(0), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k, GROUP_M=plan.group_m,
        UPCAST_DOT=interpreter_upcasts_dot(inter.dtype), num_warps=plan.num_warps,
        num_stages=plan.num_stages, **fp8.kernel_args())
    return y


COMBINE_ELEMENTS = 8192
"""Cap on a combine program's [tokens, K, columns] block of y (a few dozen registers)."""


def _combine_constexprs(num_tokens: int, top_k: int, block_h: int) -> dict[str, int]:
    """The combine kernel's block: all K rows of as many tokens as fit in COMBINE_ELEMENTS."""
    k_pad = next_power_of_2(top_k)
    fit = max(1, COMBINE_ELEMENTS // (k_pad * block_h))
    return {"BLOCK_T": min(next_power_of_2(num_tokens), 1 << (fit.bit_length() - 1)),
            "K_PAD": k_pad, "BLOCK_H": block_h}


def _combine(y: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
             plan: MoePlan) -> torch.Tensor:
    """Kernel 3: out [T, H] in y's dtype, the fp32 sum of each token's valid pairs' rows."""
    num_tokens, top_k = topk_ids.shape
    hidden = y.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=y.dtype, device=y.device)
    constexprs = _combine_constexprs(num_tokens, top_k, plan.combine_block_h)
    grid = (cdiv(num_tokens, constexprs["BLOCK_T"]), cdiv(hidden, plan.combine_block_h))
    _fused_moe_combine_kernel[grid](
        y, topk_ids, out, num_tokens, top_k, num_experts, hidden, y.stride(0),
        topk_ids.stride(0), topk_ids.stride(1), out.stride(0), **constexprs, num_warps=4)
    return out


# (T, K, E) routings compiled ahead of time: Qwen3-30B-A3B (K 8 of E 128) at 1, 64, 512 and
# 4096 tokens and Mixtral-8x7B (K 2 of E 8) at 64 and 4096 reach every rows-per-expert bucket
# and both align paths.
AOT_ROUTINGS = ((1, 8, 128), (64, 8, 128), (512, 8, 128), (4096, 8, 128), (64, 2, 8),
                (4096, 2, 8))
WEIGHT_VARIANTS = ("bf16", "block", "expert")
"""The GEMMs compiled per plan: bf16 weights, and the arch's fp8 with 128 x 128 block scales
(DeepSeek-V3) or one scale per expert (``[E, 1, 1]``, per-tensor checkpoints)."""


class _GemmKernel(NamedTuple):
    """A GEMM kernel's AOT signature: pointers ("W" the weight, "S" its scale), then ints."""

    name: str
    fn: object
    pointers: dict[str, str]
    ints: tuple[str, ...]


_SCALE_INTS = ("scale_stride_expert", "scale_stride_row", "scale_stride_k")
_GATE_UP = _GemmKernel(
    "fused_moe_gate_up", _fused_moe_gate_up_kernel,
    {"x_ptr": "*bf16", "w13_ptr": "W", "s13_ptr": "S", "inter_ptr": "*bf16"},
    ("num_pairs", "top_k", "num_experts", "hidden_size", "inter_size", "stride_x_tok",
     "stride_w13_expert", "stride_w13_row", *_SCALE_INTS, "stride_inter_pair"))
_DOWN = _GemmKernel(
    "fused_moe_down", _fused_moe_down_kernel,
    {"inter_ptr": "*bf16", "w2_ptr": "W", "s2_ptr": "S", "y_ptr": "*bf16",
     "topk_weights_ptr": "*fp32"},
    ("num_pairs", "num_experts", "hidden_size", "inter_size", "stride_inter_pair",
     "stride_w2_expert", "stride_w2_row", *_SCALE_INTS, "stride_y_pair"))
_COMBINE_POINTERS = {"y_ptr": "*bf16", "topk_ids_ptr": "*i64", "out_ptr": "*bf16"}
_COMBINE_INTS = ("num_tokens", "top_k", "num_experts", "hidden_size", "stride_y_pair",
                 "stride_ids_tok", "stride_ids_k", "stride_out_tok")


def _kernel_spec(name: str, fn: object, pointers: dict[str, str], ints: tuple[str, ...],
                 constexprs: dict[str, Any], aligned: tuple[str, ...], num_warps: int,
                 num_stages: int) -> KernelSpec:
    """One compilation: pointers, then i32 scalars, then constexprs, in the kernel's order."""
    sig = {**pointers, **{n: "i32" for n in ints}, **{n: "constexpr" for n in constexprs}}
    return KernelSpec(name=name, fn=fn, signature=sig, constexprs=constexprs, aligned=aligned,
                      num_warps=num_warps, num_stages=num_stages)


def _gemm_spec(kernel: _GemmKernel, plan: MoePlan, weights: str, arch: str) -> KernelSpec:
    """One compilation of a GEMM kernel with the plan's tile shape: bf16 activations, and
    ``weights`` one of WEIGHT_VARIANTS (fp8 in the arch's format; the scale pointer is None
    for bf16). Scale strides are not assumed 16-aligned (DeepSeek-V3's w13 rows are 56)."""
    fp8 = weights != "bf16"
    types = {"W": f"*{triton_fp8(arch)}", "S": "*fp32"} if fp8 else \
        {"W": "*bf16", "S": "constexpr"}
    pointers = {n: types.get(t, t) for n, t in kernel.pointers.items()}
    pointers.update(sorted_pair_ids_ptr="*i32", tile_expert_ids_ptr="*i32")
    constexprs: dict[str, Any] = {"BLOCK_M": plan.block_m, "BLOCK_N": plan.block_n,
                                  "BLOCK_K": plan.block_k, "GROUP_M": plan.group_m,
                                  "UPCAST_DOT": False, "W_FP8": fp8,
                                  "K_BLOCKED": weights == "block"}
    if not fp8:
        constexprs.update({n: None for n, t in kernel.pointers.items() if t == "S"})
    aligned = tuple(n for n in kernel.ints if n.startswith("stride") or n.endswith("_size"))
    tile = f"m{plan.block_m}n{plan.block_n}k{plan.block_k}w{plan.num_warps}s{plan.num_stages}"
    variant = "bf16" if not fp8 else f"bf16,{triton_fp8(arch)},{weights}"
    return _kernel_spec(f"{kernel.name}[{variant},{tile}]", kernel.fn, pointers, kernel.ints,
                        constexprs, aligned, plan.num_warps, plan.num_stages)


def _combine_spec(tokens: int, top_k: int, plan: MoePlan) -> KernelSpec:
    """The bf16 combine kernel with int64 ids at one batch shape."""
    c = _combine_constexprs(tokens, top_k, plan.combine_block_h)
    name = f"fused_moe_combine[bf16,t{c['BLOCK_T']}k{c['K_PAD']}h{c['BLOCK_H']}]"
    return _kernel_spec(name, _fused_moe_combine_kernel, _COMBINE_POINTERS, _COMBINE_INTS, c,
                        ("hidden_size", "stride_y_pair", "stride_out_tok"), 4, 1)


def aot_specs(arch: str) -> list[KernelSpec]:
    """GEMMs of each distinct tile plan (bf16 and the arch's fp8 weights: WEIGHT_VARIANTS),
    the align kernel of each routing that uses it, and the combine kernel, over AOT_ROUTINGS
    (decode to prefill)."""
    specs: dict[str, KernelSpec] = {}
    for tokens, top_k, experts in AOT_ROUTINGS:
        plan = moe_plan(tokens * top_k, experts, arch)
        found = [_gemm_spec(kernel, plan, weights, arch)
                 for weights in WEIGHT_VARIANTS for kernel in (_GATE_UP, _DOWN)]
        found.append(_combine_spec(tokens, top_k, plan))
        if plan.triton_align:
            found.append(align_spec(tokens * top_k, experts, plan.block_m))
        specs.update((spec.name, spec) for spec in found if spec.name not in specs)
    return list(specs.values())
