"""Paged decode for multi-head latent attention (DeepSeek MLA), absorbed form.

Every head attends over the same cached latent rows (MQA with one KV head): the latent is both
K (all D elements) and V (its first kv_lora_rank elements). The cache keeps the engine's shape
with one "KV head" of half the latent (disagg/models/mla.py):

    kv_layer [num_blocks, 2, block_size, 1, half]      half = ceil(D / 2), D = 576 on DeepSeek
    latent of a token = kv_layer[b, 0, off, 0, :] ++ kv_layer[b, 1, off, 0, :D - half]
                        |<-------- 288 -------->|    |<--------- 288 ---------->|
                        0                     288    288                       576
                        |<-------------- kv_lora_rank = 512 ---------->|<rope 64>|

A program (seq, head block, split) loads a tile of BLOCK_N latent rows once and uses it for
BLOCK_H heads, both as K (scores over all D elements) and as V (the weighted sum). Each half is
read as a power-of-two MAIN chunk and a TAIL chunk (288 = 256 + 32), so every load is one
contiguous masked run and no tile is padded to 512:

    scores = q[K main] . K main + q[K tail] . K tail + q[V main] . V main + q[V tail] . V tail
    out    = [ p @ K main | p @ K tail | p @ V main | (p @ V tail) ] cut at kv_lora_rank

Long contexts are split along the sequence (flash-decoding) and merged by the reduce kernel of
paged_decode_attention (same partial layout: acc [B, H, splits, kv_lora_rank], (max, sum)
[B, H, splits, 2] in the log2 domain); with one split the attention kernel writes the output.

An fp8 cache (hip_kernels/kv_fp8.py) holds the latent with ONE per-layer scale for both halves
(``kv_scale``, the layer's k_scale: the latent is one tensor). Tiles are upcast to q's dtype;
kv_scale is folded into the softmax scale and into the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hip_kernels.attention_tiles import LOG2_E, token_offsets
from hip_kernels.kv_fp8 import TRITON_FP8, dequantize_ref, fp8_kv_dtype_for, is_fp8
from hip_kernels.launch_config import KernelSpec, bucket, get_int, load_config
from hip_kernels.paged_decode_attention import _paged_decode_reduce_kernel
from hip_kernels.triton_compat import (
    cdiv,
    interpreter_upcasts_dot,
    jit,
    next_power_of_2,
    require_triton,
    tl,
)

KERNEL = "paged_mla_decode"
MIN_DOT = 16
"""tl.dot needs every dimension >= 16: head blocks, token tiles and latent chunks."""


def gather_latents(kv_layer: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                   latent_dim: int) -> torch.Tensor:
    """The first ``seq_len`` cached latents of one sequence, [seq_len, latent_dim]."""
    block_size, half = kv_layer.shape[2], kv_layer.shape[4]
    blocks = kv_layer[block_table[:cdiv(seq_len, block_size)].long(), :, :, 0]  # [n, 2, bs, half]
    rows = blocks.permute(0, 2, 1, 3).reshape(-1, 2 * half)  # token-major: K half ++ V half
    return rows[:seq_len, :latent_dim]


def paged_mla_decode_ref(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                         kv_scale: float = 1.0) -> torch.Tensor:
    """One query per sequence and head over its cached latents (absorbed MLA), in torch.

    q [B, H, D] in latent space; kv_layer [NB, 2, bs, 1, ceil(D / 2)]; block_tables
    [B, max_blocks] int32; seq_lens [B] int32 (>= 1, already cached). Returns
    [B, H, kv_lora_rank] in q's dtype: softmax(scale * q . latent) @ latent[:, :kv_lora_rank],
    computed in fp32 (fp64 for fp64 inputs). One sequence at a time. An fp8 cache is read as
    latent * kv_scale; other caches ignore it.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    out = q.new_empty(q.shape[0], q.shape[1], kv_lora_rank)
    for i, seq_len in enumerate(seq_lens.tolist()):
        latent = dequantize_ref(gather_latents(kv_layer, block_tables[i], seq_len, q.shape[2]),
                                kv_scale, compute)
        scores = torch.einsum("hd,td->ht", q[i].to(compute), latent) * scale
        probs = torch.softmax(scores, dim=-1)
        out[i] = torch.einsum("ht,tr->hr", probs, latent[:, :kv_lora_rank]).to(q.dtype)
    return out


@jit
def _load_chunk(row_ptrs, row_mask, LO: tl.constexpr, WIDTH: tl.constexpr,
                LIMIT: tl.constexpr):
    """Columns LO .. LO + WIDTH of each row, zero at and past LIMIT (the half's valid length)."""
    cols = LO + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & (cols < LIMIT)[None, :]
    return tl.load(row_ptrs + cols[None, :], mask=mask, other=0.0)


@jit
def _store_chunk(row_ptrs, row_mask, acc, FIRST: tl.constexpr, LO: tl.constexpr,
                 WIDTH: tl.constexpr, LIMIT: tl.constexpr, LORA_RANK: tl.constexpr):
    """Store acc [rows, WIDTH] at latent columns FIRST + LO + c that are output (< LORA_RANK)."""
    cols = LO + tl.arange(0, WIDTH)
    mask = row_mask[:, None] & ((cols < LIMIT) & (FIRST + cols < LORA_RANK))[None, :]
    tl.store(row_ptrs + FIRST + cols[None, :], acc.to(row_ptrs.dtype.element_ty), mask=mask)


@jit
def _paged_mla_decode_kernel(
        q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
        qk_scale_log2, kv_scale, split_tokens, num_splits, num_heads, stride_q_seq,
        stride_q_head, stride_kv_block, stride_kv_half, stride_kv_tok, stride_table_seq,
        LATENT_DIM: tl.constexpr, HALF: tl.constexpr, LORA_RANK: tl.constexpr,
        MAIN: tl.constexpr, TAIL: tl.constexpr, V_TAIL_OUT: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
        DIRECT: tl.constexpr, UPCAST_DOT: tl.constexpr, KV_FP8: tl.constexpr):
    """Program (seq, head block, split): BLOCK_H heads over the positions of one split.

    KV_FP8: fp8 latent tiles upcast to q's dtype; kv_scale is inside qk_scale_log2 and scales
    the output rows (unused otherwise)."""
    seq = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < num_heads
    V_LEN: tl.constexpr = LATENT_DIM - HALF  # HALF, or HALF - 1 when D is odd (one pad)
    q_rows = q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head
    q_km = _load_chunk(q_rows, head_mask, 0, MAIN, HALF)
    q_kt = _load_chunk(q_rows, head_mask, MAIN, TAIL, HALF)
    q_vm = _load_chunk(q_rows + HALF, head_mask, 0, MAIN, V_LEN)
    q_vt = _load_chunk(q_rows + HALF, head_mask, MAIN, TAIL, V_LEN)
    if UPCAST_DOT:
        q_km, q_kt = q_km.to(tl.float32), q_kt.to(tl.float32)
        q_vm, q_vt = q_vm.to(tl.float32), q_vt.to(tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc_km = tl.zeros([BLOCK_H, MAIN], tl.float32)
    acc_kt = tl.zeros([BLOCK_H, TAIL], tl.float32)
    acc_vm = tl.zeros([BLOCK_H, MAIN], tl.float32)
    acc_vt = tl.zeros([BLOCK_H, TAIL], tl.float32)
    table_row = block_tables_ptr + seq * stride_table_seq
    for tile_start in range(start, end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        pos_mask = positions < end
        k_rows = kv_ptr + token_offsets(table_row, positions, pos_mask, stride_kv_block,
                                        stride_kv_tok, KV_BLOCK_SIZE)[:, None]
        # One load of the tile serves as K and as V, for every head of the block.
        k_main = _load_chunk(k_rows, pos_mask, 0, MAIN, HALF)
        k_tail = _load_chunk(k_rows, pos_mask, MAIN, TAIL, HALF)
        v_main = _load_chunk(k_rows + stride_kv_half, pos_mask, 0, MAIN, V_LEN)
        v_tail = _load_chunk(k_rows + stride_kv_half, pos_mask, MAIN, TAIL, V_LEN)
        if KV_FP8:
            k_main, k_tail = k_main.to(q_km.dtype), k_tail.to(q_km.dtype)
            v_main, v_tail = v_main.to(q_km.dtype), v_tail.to(q_km.dtype)
        if UPCAST_DOT:
            k_main, k_tail = k_main.to(tl.float32), k_tail.to(tl.float32)
            v_main, v_tail = v_main.to(tl.float32), v_tail.to(tl.float32)
        s = tl.dot(q_km, tl.trans(k_main), input_precision="ieee")
        s = tl.dot(q_kt, tl.trans(k_tail), s, input_precision="ieee")
        s = tl.dot(q_vm, tl.trans(v_main), s, input_precision="ieee")
        s = tl.dot(q_vt, tl.trans(v_tail), s, input_precision="ieee")
        s = tl.where(pos_mask[None, :], s * qk_scale_log2, float("-inf"))
        # The tile's first position is always visible, so m_new is finite for every row.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        p = p.to(k_main.dtype)
        acc_km = tl.dot(p, k_main, acc_km * alpha[:, None], input_precision="ieee")
        acc_kt = tl.dot(p, k_tail, acc_kt * alpha[:, None], input_precision="ieee")
        acc_vm = tl.dot(p, v_main, acc_vm * alpha[:, None], input_precision="ieee")
        if V_TAIL_OUT:
            acc_vt = tl.dot(p, v_tail, acc_vt * alpha[:, None], input_precision="ieee")
    # Rows: out [B, H, LORA_RANK] directly, or this split's partial [B, H, splits, LORA_RANK].
    if DIRECT:
        inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
        rows = out_ptr + (seq * num_heads + heads)[:, None] * LORA_RANK
    else:
        inv_l = tl.full([BLOCK_H], 1.0, tl.float32)
        part = (seq * num_heads + heads) * num_splits + split
        rows = part_acc_ptr + part[:, None] * LORA_RANK
        tl.store(part_ml_ptr + part * 2, m_i, mask=head_mask)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=head_mask)
    if KV_FP8:
        inv_l = inv_l * kv_scale
    _store_chunk(rows, head_mask, acc_km * inv_l[:, None], 0, 0, MAIN, HALF, LORA_RANK)
    _store_chunk(rows, head_mask, acc_kt * inv_l[:, None], 0, MAIN, TAIL, HALF, LORA_RANK)
    _store_chunk(rows, head_mask, acc_vm * inv_l[:, None], HALF, 0, MAIN, V_LEN, LORA_RANK)
    if V_TAIL_OUT:
        _store_chunk(rows, head_mask, acc_vt * inv_l[:, None], HALF, MAIN, TAIL, V_LEN,
                     LORA_RANK)


@dataclass(frozen=True, slots=True)
class MlaDecodePlan:
    """How one MLA decode launch is cut: heads and tokens per tile, warps, the split."""

    block_h: int
    """Heads per program (>= 16 for tl.dot; extra rows are masked)."""
    block_n: int
    num_warps: int
    num_stages: int
    reduce_num_warps: int
    split_tokens: int
    """Positions per split, a multiple of block_n."""
    num_splits: int
    """1 means no reduce kernel: the attention kernel writes the output."""


def mla_decode_plan(batch_size: int, num_heads: int, max_context_tokens: int,
                    arch: str | None = None) -> MlaDecodePlan:
    """Split so that the programs fill at most one wave of resident programs.

    As paged_decode_attention's plan, with (sequence, head block) pairs in place of
    (sequence, kv head). The tile (block_h, block_n, num_warps) is bucketed by head count:
    more heads per program make the kernel compute-bound. Sized from the block table's width:
    no host sync on seq_lens.
    """
    cfg = load_config(KERNEL, arch)
    block_n = bucket(cfg, "block_n", num_heads)
    block_h = min(bucket(cfg, "block_h", num_heads), max(MIN_DOT, next_power_of_2(num_heads)))
    wave = get_int(cfg, "num_compute_units") * get_int(cfg, "programs_per_cu")
    context = max(1, max_context_tokens)
    wanted = wave // max(1, batch_size * cdiv(num_heads, block_h))
    most = min(get_int(cfg, "max_splits"), cdiv(context, get_int(cfg, "min_split_tokens")))
    splits = max(1, min(wanted, most))
    split_tokens = cdiv(cdiv(context, splits), block_n) * block_n
    return MlaDecodePlan(block_h=block_h, block_n=block_n,
                         num_warps=bucket(cfg, "num_warps", num_heads),
                         num_stages=get_int(cfg, "num_stages"),
                         reduce_num_warps=get_int(cfg, "reduce_num_warps"),
                         split_tokens=split_tokens, num_splits=cdiv(context, split_tokens))


def latent_chunks(half: int) -> tuple[int, int]:
    """(MAIN, TAIL) widths covering one half: 288 -> (256, 32); both powers of two >= 16.

    A half that is itself a power of two gets a 16-wide TAIL that is wholly masked.
    """
    main = max(MIN_DOT, 1 << (half.bit_length() - 1))
    return main, max(MIN_DOT, next_power_of_2(max(1, half - main)))


def check_mla_shapes(q: torch.Tensor, kv_layer: torch.Tensor, kv_lora_rank: int) -> None:
    """Validate q [B, H, D] against kv_layer [NB, 2, bs, 1, ceil(D / 2)] and kv_lora_rank."""
    latent_dim = q.shape[-1]
    half = cdiv(latent_dim, 2)
    if q.dim() != 3:
        raise ValueError(f"{KERNEL}: q {tuple(q.shape)} is not [batch, heads, latent_dim]")
    if kv_layer.dim() != 5 or tuple(kv_layer.shape[3:]) != (1, half) or kv_layer.shape[1] != 2:
        raise ValueError(f"{KERNEL}: kv_layer {tuple(kv_layer.shape)} is not "
                         f"[num_blocks, 2, block_size, 1, {half}] for a {latent_dim}-wide latent")
    if not 0 < kv_lora_rank <= latent_dim:
        raise ValueError(f"{KERNEL}: kv_lora_rank {kv_lora_rank} not in 1..{latent_dim}")
    if kv_layer.stride(-1) != 1:
        raise ValueError(f"{KERNEL}: kv_layer's last dim must be contiguous")


def paged_mla_decode(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                     kv_scale: float = 1.0) -> torch.Tensor:
    """Absorbed-MLA decode over the paged latent cache, as the reference (Triton).

    q [B, H, D]; kv_layer [NB, 2, bs, 1, ceil(D / 2)] (a strided view of the whole cache is
    fine; fp8 is read as latent * kv_scale); block_tables [B, max_blocks] int32; seq_lens [B]
    int32 (>= 1, already cached). Returns [B, H, kv_lora_rank] in q's dtype; fp32 softmax and
    accumulation. Bytes moved: sum(seq_lens) * D * kv elt (latents, read once per head block)
    + B * H * (D + kv_lora_rank) * elt. No host sync: CUDA-graph safe.
    """
    require_triton(KERNEL)
    check_mla_shapes(q, kv_layer, kv_lora_rank)
    plan = mla_decode_plan(q.shape[0], q.shape[1], block_tables.shape[1] * kv_layer.shape[2])
    return _launch_mla_decode(q, kv_layer, block_tables, seq_lens, scale, kv_lora_rank, plan,
                              kv_scale)


def _launch_mla_decode(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                       plan: MlaDecodePlan, kv_scale: float = 1.0) -> torch.Tensor:
    """Run the kernels with an explicit plan (tests force splits through this)."""
    bsz, num_heads, latent_dim = q.shape
    half = kv_layer.shape[4]
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty((bsz, num_heads, kv_lora_rank), dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    direct = plan.num_splits == 1
    shape = (bsz, num_heads, plan.num_splits) if not direct else (1, 1, 1)
    part_acc = torch.empty(*shape, kv_lora_rank, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(*shape, 2, dtype=torch.float32, device=q.device)
    main, tail = latent_chunks(half)
    grid = (bsz, cdiv(num_heads, plan.block_h), plan.num_splits)
    fp8 = is_fp8(kv_layer.dtype)
    _paged_mla_decode_kernel[grid](
        q, kv_layer, block_tables, seq_lens, out, part_acc, part_ml,
        scale * (kv_scale if fp8 else 1.0) * LOG2_E, kv_scale, plan.split_tokens,
        plan.num_splits, num_heads, q.stride(0), q.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), block_tables.stride(0),
        LATENT_DIM=latent_dim, HALF=half, LORA_RANK=kv_lora_rank, MAIN=main, TAIL=tail,
        V_TAIL_OUT=kv_lora_rank > half + main, BLOCK_H=plan.block_h, BLOCK_N=plan.block_n,
        KV_BLOCK_SIZE=kv_layer.shape[2], DIRECT=direct,
        UPCAST_DOT=interpreter_upcasts_dot(q.dtype if fp8 else kv_layer.dtype), KV_FP8=fp8,
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    if not direct:
        _paged_decode_reduce_kernel[(bsz, num_heads)](
            part_acc, part_ml, seq_lens, out, plan.split_tokens, plan.num_splits,
            num_heads * kv_lora_rank, HEAD_DIM=kv_lora_rank,
            BLOCK_D=next_power_of_2(kv_lora_rank), num_warps=plan.reduce_num_warps)
    return out


def _kernel_signature(cache: str = "*bf16") -> dict[str, str]:
    """Non-constexpr parameters of the attention kernel, typed as at real bf16 shapes (the
    cache bf16 or fp8)."""
    sig = {"q_ptr": "*bf16", "kv_ptr": cache, "block_tables_ptr": "*i32",
           "seq_lens_ptr": "*i32", "out_ptr": "*bf16", "part_acc_ptr": "*fp32",
           "part_ml_ptr": "*fp32", "qk_scale_log2": "fp32", "kv_scale": "fp32"}
    ints = ("split_tokens", "num_splits", "num_heads", "stride_q_seq", "stride_q_head",
            "stride_kv_block", "stride_kv_half", "stride_kv_tok", "stride_table_seq")
    return sig | {name: "i32" for name in ints}


def aot_specs(arch: str) -> list[KernelSpec]:
    """DeepSeek shapes, bf16: D 576 (half 288), kv_lora_rank 512, block size 16, H 16 and
    128; direct and split; the fp8 cache at H 128, split; and the reduce at kv_lora_rank 512."""
    aligned = ("split_tokens", "num_heads", "stride_q_seq", "stride_q_head", "stride_kv_block",
               "stride_kv_half", "stride_kv_tok")
    main, tail = latent_chunks(288)
    specs = []
    variants = [(heads, direct, False) for heads in (16, 128) for direct in (True, False)]
    for heads, direct, fp8 in [*variants, (128, False, True)]:
        plan = mla_decode_plan(1, heads, 8192, arch)
        constexprs = {"LATENT_DIM": 576, "HALF": 288, "LORA_RANK": 512, "MAIN": main,
                      "TAIL": tail, "V_TAIL_OUT": False, "BLOCK_H": plan.block_h,
                      "BLOCK_N": plan.block_n, "KV_BLOCK_SIZE": 16, "DIRECT": direct,
                      "UPCAST_DOT": False, "KV_FP8": fp8}
        cache = f"*{TRITON_FP8[fp8_kv_dtype_for(arch)]}" if fp8 else "*bf16"
        sig = _kernel_signature(cache) | {name: "constexpr" for name in constexprs}
        mode = "direct" if direct else "split"
        kv = "fp8" if fp8 else "bf16"
        specs.append(KernelSpec(name=f"{KERNEL}[{kv},h{heads},d576,bs16,{mode}]",
                                fn=_paged_mla_decode_kernel, signature=sig,
                                constexprs=constexprs, aligned=aligned,
                                num_warps=plan.num_warps, num_stages=plan.num_stages,
                                launch={"block_h": plan.block_h}))
    reduce_sig = {"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "seq_lens_ptr": "*i32",
                  "out_ptr": "*bf16", "split_tokens": "i32", "num_splits": "i32",
                  "stride_out_seq": "i32", "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr"}
    specs.append(KernelSpec(name=f"{KERNEL}_reduce[bf16,r512]", fn=_paged_decode_reduce_kernel,
                            signature=reduce_sig, constexprs={"HEAD_DIM": 512, "BLOCK_D": 512},
                            aligned=("split_tokens", "stride_out_seq"),
                            num_warps=mla_decode_plan(1, 16, 8192, arch).reduce_num_warps))
    return specs
