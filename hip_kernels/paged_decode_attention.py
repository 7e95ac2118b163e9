"""Paged decode attention: one query token per sequence, split along the sequence.

GQA: program (seq, kv head, split) handles the GROUP = Hq / Hk query heads that share a kv
head, so each K/V tile is read once for the whole group. Long contexts are split along the
sequence (flash-decoding): each split writes an unnormalised partial (acc, running max,
running sum) and a reduce kernel merges them; with one split the attention kernel writes the
output directly.

    q [B, Hq, D] --+--> split 0: acc, m, l --+
                   +--> split 1: acc, m, l --+--> reduce --> out [B, Hq, D]
                   +--> ...                  |

An fp8 cache (hip_kernels/kv_fp8.py) is read in fp8 and upcast tile by tile to q's dtype;
k_scale is folded into the softmax scale and v_scale into acc (so partials are already
dequantized and the reduce kernel is the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hip_kernels.attention_tiles import (
    LOG2_E,
    attend_tile,
    check_attention_shapes,
    kv_strides,
    token_offsets,
)
from hip_kernels.kv_fp8 import TRITON_FP8, dequantize_ref, fp8_kv_dtype_for, is_fp8
from hip_kernels.launch_config import KernelSpec, get_int, load_config
from hip_kernels.triton_compat import (
    cdiv,
    interpreter_upcasts_dot,
    jit,
    next_power_of_2,
    require_triton,
    tl,
)

KERNEL = "paged_decode_attention"


def paged_decode_attention_ref(q: torch.Tensor, kv_layer: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float, k_scale: float = 1.0,
                               v_scale: float = 1.0) -> torch.Tensor:
    """One query token per sequence attending to its whole cached context (GQA).

    q [B, Hq, D]; kv_layer [NB, 2, bs, Hk, D]; block_tables [B, max_blocks] int32;
    seq_lens [B] int32 (context length including the current token, already cached).
    Returns [B, Hq, D] in q's dtype. Computed in fp32. Padded to the longest sequence with a
    mask, so it is batched (the CPU engine's decode path). An fp8 cache is read as
    K * k_scale and V * v_scale; other caches ignore the scales.
    """
    bsz, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    group = num_q_heads // num_kv_heads
    max_len = int(seq_lens.max().item()) if bsz else 0
    max_blocks = (max_len + block_size - 1) // block_size
    table = block_tables[:, :max_blocks].long()
    blocks = kv_layer[table]  # [B, nb, 2, bs, Hk, D]
    k = blocks[:, :, 0].reshape(bsz, max_blocks * block_size, num_kv_heads, head_dim)
    v = blocks[:, :, 1].reshape(bsz, max_blocks * block_size, num_kv_heads, head_dim)
    qf = q.float().view(bsz, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bthd->bhgt", qf,
                          dequantize_ref(k, k_scale, torch.float32)) * scale
    pos = torch.arange(max_blocks * block_size, device=q.device)
    mask = pos[None, :] >= seq_lens.long()[:, None]  # [B, T]
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, dequantize_ref(v, v_scale, torch.float32))
    return out.reshape(bsz, num_q_heads, head_dim).to(q.dtype)


@jit
def _paged_decode_attention_kernel(
        q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
        qk_scale_log2, v_scale, split_tokens, num_splits, stride_q_seq, stride_q_head,
        stride_kv_block, stride_kv_kv, stride_kv_tok, stride_kv_head, stride_table_seq,
        stride_out_seq, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr, UPCAST_DOT: tl.constexpr, KV_FP8: tl.constexpr):
    """Program (seq, kv head, split): the q-head group over positions of one split.

    KV_FP8: K/V tiles are fp8, upcast to q's dtype; qk_scale_log2 carries k_scale and acc is
    multiplied by v_scale (unused otherwise)."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    q_mask = (rows < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
                mask=q_mask, other=0.0)
    if not KV_FP8:
        q = q.to(kv_ptr.dtype.element_ty)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq * stride_table_seq
    kv_head_ptr = kv_ptr + kv_head * stride_kv_head
    for tile_start in range(start, end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        pos_mask = positions < end
        offsets = token_offsets(table_row, positions, pos_mask, stride_kv_block, stride_kv_tok,
                                 KV_BLOCK_SIZE)
        ptrs = kv_head_ptr + offsets[:, None] + dims[None, :]
        tile_mask = pos_mask[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(ptrs, mask=tile_mask, other=0.0)
        v = tl.load(ptrs + stride_kv_kv, mask=tile_mask, other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        m_i, l_i, acc = attend_tile(q, k, v, pos_mask[None, :], m_i, l_i, acc, qk_scale_log2,
                                     UPCAST_DOT)
    if KV_FP8:
        acc = acc * v_scale
    if DIRECT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_ptrs = out_ptr + seq * stride_out_seq + heads[:, None] * HEAD_DIM + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # Partials [B, Hq, num_splits, HEAD_DIM] and [B, Hq, num_splits, 2] (max, sum), fp32.
        part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)
        tl.store(part_ml_ptr + part * 2, m_i, mask=rows < GROUP)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=rows < GROUP)


@jit
def _paged_decode_reduce_kernel(part_acc_ptr, part_ml_ptr, seq_lens_ptr, out_ptr, split_tokens,
                                num_splits, stride_out_seq, HEAD_DIM: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    """Program (seq, q head): merge the non-empty splits' partials into the output row."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_used = tl.minimum(tl.cdiv(tl.load(seq_lens_ptr + seq), split_tokens), num_splits)
    dims = tl.arange(0, BLOCK_D)
    part = (seq * tl.num_programs(1) + head) * num_splits
    m_total = float("-inf")
    l_total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for split in range(0, num_used):
        m_split = tl.load(part_ml_ptr + (part + split) * 2)
        l_split = tl.load(part_ml_ptr + (part + split) * 2 + 1)
        acc_split = tl.load(part_acc_ptr + (part + split) * HEAD_DIM + dims,
                            mask=dims < HEAD_DIM, other=0.0)
        m_new = tl.maximum(m_total, m_split)
        alpha = tl.exp2(m_total - m_new)
        beta = tl.exp2(m_split - m_new)
        acc = acc * alpha + acc_split * beta
        l_total = l_total * alpha + l_split * beta
        m_total = m_new
    out = acc / tl.where(l_total == 0.0, 1.0, l_total)
    tl.store(out_ptr + seq * stride_out_seq + head * HEAD_DIM + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """How one decode launch is cut: tile size, warps, and the split along the sequence."""

    block_n: int
    num_warps: int
    num_stages: int
    reduce_num_warps: int
    split_tokens: int
    """Positions per split, a multiple of block_n."""
    num_splits: int
    """1 means no reduce kernel: the attention kernel writes the output."""


def decode_plan(batch_size: int, num_kv_heads: int, max_context_tokens: int,
                arch: str | None = None) -> DecodePlan:
    """Split so that the programs fill at most one wave of resident programs.

    A wave is ``num_compute_units * programs_per_cu`` (programs resident per CU at this
    kernel's register use). Rounding up instead would leave a second, nearly empty wave
    (measured on H100: 9 splits at batch 8 x 32k ran at 73% of copy bandwidth, 8 at 96%).
    Sized from the block table's width (no host sync on seq_lens): the engine should pass a
    table trimmed to the batch's longest sequence.
    """
    cfg = load_config(KERNEL, arch)
    block_n = get_int(cfg, "block_n")
    wave = get_int(cfg, "num_compute_units") * get_int(cfg, "programs_per_cu")
    context = max(1, max_context_tokens)
    wanted = wave // max(1, batch_size * num_kv_heads)
    most = min(get_int(cfg, "max_splits"), cdiv(context, get_int(cfg, "min_split_tokens")))
    splits = max(1, min(wanted, most))
    split_tokens = cdiv(cdiv(context, splits), block_n) * block_n
    # software pipelining pays only when a program loops over many tiles: a long split gets
    # the deeper setting, a split of a tile or two the shallow one
    long = split_tokens > get_int(cfg, "long_split_tokens")
    return DecodePlan(block_n=block_n, num_warps=get_int(cfg, "num_warps"),
                      num_stages=get_int(cfg, "num_stages_long" if long else "num_stages"),
                      reduce_num_warps=get_int(cfg, "reduce_num_warps"),
                      split_tokens=split_tokens, num_splits=cdiv(context, split_tokens))


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, k_scale: float = 1.0,
                           v_scale: float = 1.0) -> torch.Tensor:
    """One query token per sequence over its paged context (GQA), as the reference.

    q [B, Hq, D]; kv_layer [NB, 2, bs, Hk, D] (strided view of the whole cache is fine; fp8
    is read as K * k_scale, V * v_scale); block_tables [B, max_blocks] int32; seq_lens [B]
    int32 (>= 1, already cached). Returns [B, Hq, D] in q's dtype; fp32 softmax and
    accumulation. Bytes moved: sum(seq_lens) * Hk * D * 2 * kv elt + 2 * B * Hq * D * elt.
    """
    require_triton("paged_decode_attention")
    check_attention_shapes("paged_decode_attention", q, kv_layer)
    plan = decode_plan(q.shape[0], kv_layer.shape[3], block_tables.shape[1] * kv_layer.shape[2])
    return _launch_decode(q, kv_layer, block_tables, seq_lens, scale, plan, k_scale, v_scale)


def _launch_decode(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float, plan: DecodePlan,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Run the decode kernels with an explicit plan (tests force splits through this)."""
    bsz, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_layer.shape[3]
    group = num_q_heads // num_kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty((bsz, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    direct = plan.num_splits == 1
    shape = (bsz, num_q_heads, plan.num_splits) if not direct else (1, 1, 1)
    part_acc = torch.empty(*shape, head_dim, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(*shape, 2, dtype=torch.float32, device=q.device)
    block_d = max(16, next_power_of_2(head_dim))
    fp8 = is_fp8(kv_layer.dtype)
    _paged_decode_attention_kernel[(bsz, num_kv_heads, plan.num_splits)](
        q, kv_layer, block_tables, seq_lens, out, part_acc, part_ml,
        scale * (k_scale if fp8 else 1.0) * LOG2_E, v_scale, plan.split_tokens,
        plan.num_splits, q.stride(0), q.stride(1), *kv_strides(kv_layer),
        block_tables.stride(0), num_q_heads * head_dim, GROUP=group,
        GROUP_PAD=max(16, next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        KV_BLOCK_SIZE=kv_layer.shape[2], BLOCK_N=plan.block_n, DIRECT=direct,
        UPCAST_DOT=interpreter_upcasts_dot(q.dtype if fp8 else kv_layer.dtype), KV_FP8=fp8,
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    if not direct:
        _paged_decode_reduce_kernel[(bsz, num_q_heads)](
            part_acc, part_ml, seq_lens, out, plan.split_tokens, plan.num_splits,
            num_q_heads * head_dim, HEAD_DIM=head_dim, BLOCK_D=block_d,
            num_warps=plan.reduce_num_warps)
    return out


def _decode_signature(cache: str = "*bf16") -> dict[str, str]:
    """Non-constexpr parameters of the attention kernel, typed as at real bf16 shapes (the
    cache bf16 or fp8)."""
    sig = {"q_ptr": "*bf16", "kv_ptr": cache, "block_tables_ptr": "*i32",
           "seq_lens_ptr": "*i32", "out_ptr": "*bf16", "part_acc_ptr": "*fp32",
           "part_ml_ptr": "*fp32", "qk_scale_log2": "fp32", "v_scale": "fp32"}
    ints = ("split_tokens", "num_splits", "stride_q_seq", "stride_q_head", "stride_kv_block",
            "stride_kv_kv", "stride_kv_tok", "stride_kv_head", "stride_table_seq",
            "stride_out_seq")
    return sig | {name: "i32" for name in ints}


def aot_specs(arch: str) -> list[KernelSpec]:
    """bf16, head_dim 128, block size 16, GROUP 4 and 8; direct and split; the fp8 cache at
    GROUP 8, split; and the reduce."""
    plan = decode_plan(64, 8, 4096, arch)
    aligned = ("split_tokens", "stride_q_seq", "stride_q_head", "stride_kv_block",
               "stride_kv_kv", "stride_kv_tok", "stride_kv_head", "stride_out_seq")
    specs = []
    variants = [(group, direct, False) for group in (4, 8) for direct in (True, False)]
    for group, direct, fp8 in [*variants, (8, False, True)]:
        constexprs = {"GROUP": group, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_D": 128,
                      "KV_BLOCK_SIZE": 16, "BLOCK_N": plan.block_n, "DIRECT": direct,
                      "UPCAST_DOT": False, "KV_FP8": fp8}
        cache = f"*{TRITON_FP8[fp8_kv_dtype_for(arch)]}" if fp8 else "*bf16"
        sig = _decode_signature(cache) | {name: "constexpr" for name in constexprs}
        mode = "direct" if direct else "split"
        kv = "fp8" if fp8 else "bf16"
        specs.append(KernelSpec(name=f"{KERNEL}[{kv},g{group},d128,bs16,{mode}]",
                                fn=_paged_decode_attention_kernel, signature=sig,
                                constexprs=constexprs, aligned=aligned,
                                num_warps=plan.num_warps, num_stages=plan.num_stages))
    reduce_sig = {"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "seq_lens_ptr": "*i32",
                  "out_ptr": "*bf16", "split_tokens": "i32", "num_splits": "i32",
                  "stride_out_seq": "i32", "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr"}
    specs.append(KernelSpec(name="paged_decode_reduce[bf16,d128]",
                            fn=_paged_decode_reduce_kernel, signature=reduce_sig,
                            constexprs={"HEAD_DIM": 128, "BLOCK_D": 128},
                            aligned=("split_tokens", "stride_out_seq"),
                            num_warps=plan.reduce_num_warps))
    return specs
