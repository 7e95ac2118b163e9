"""Paged prefill/extend attention: causal attention of packed query chunks over the cache.

Program (q tile, kv head) takes BLOCK_Q query tokens x the GROUP q heads of one kv head as
the BLOCK_M rows of its score tile (row r = token r // GROUP, head r % GROUP), so K/V tiles
are shared by the group. Tiles are numbered across the packed batch (a device-side prefix sum
of per-sequence tile counts), so the grid is sized without a host sync.

An fp8 cache (hip_kernels/kv_fp8.py) is upcast tile by tile to q's dtype; k_scale is folded
into the softmax scale and v_scale into the output.
"""

from __future__ import annotations

import torch

from hip_kernels.attention_tiles import (
    LOG2_E,
    StepCache,
    attend_tile,
    check_attention_shapes,
    kv_strides,
    tile_starts,
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

KERNEL = "paged_prefill_attention"


def _gather_kv(kv_layer: torch.Tensor, block_table: torch.Tensor, seq_len: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence as [seq_len, Hk, D] each."""
    block_size = kv_layer.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = kv_layer[block_table[:num_blocks].long()]  # [n, 2, bs, Hk, D]
    k = blocks[:, 0].reshape(-1, *blocks.shape[-2:])[:seq_len]
    v = blocks[:, 1].reshape(-1, *blocks.shape[-2:])[:seq_len]
    return k, v


def paged_prefill_attention_ref(q: torch.Tensor, kv_layer: torch.Tensor,
                                block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                seq_lens: torch.Tensor, scale: float, k_scale: float = 1.0,
                                v_scale: float = 1.0,
                                step_cache: StepCache | None = None) -> torch.Tensor:
    """Causal attention of a packed batch of query chunks over the paged cache.

    q [T, Hq, D] packs B sequences: sequence i owns rows query_start_loc[i]:query_start_loc[i+1]
    (int32 [B+1]); those rows are positions seq_lens[i]-n_i .. seq_lens[i]-1, where seq_lens [B]
    int32 counts cached prefix + this chunk, all already written into kv_layer. Covers prefill,
    chunked prefill with a cached prefix, and decode (n_i = 1). Returns [T, Hq, D]. An fp8
    cache is read as K * k_scale and V * v_scale; other caches ignore the scales.
    ``step_cache`` is the launcher's (see paged_prefill_attention); unused here.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_layer.shape[3]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        lo, hi = starts[i], starts[i + 1]
        n = hi - lo
        if n == 0:
            continue
        k, v = _gather_kv(kv_layer, block_tables[i], seq_len)
        qi = q[lo:hi].float().view(n, num_kv_heads, group, head_dim)
        scores = torch.einsum("nhgd,thd->hgnt", qi,
                              dequantize_ref(k, k_scale, torch.float32)) * scale
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        oi = torch.einsum("hgnt,thd->nhgd", probs, dequantize_ref(v, v_scale, torch.float32))
        out[lo:hi] = oi.reshape(n, num_q_heads, head_dim).to(q.dtype)
    return out


@jit
def _find_sequence(tile_starts_ptr, tile, num_seqs):
    """Largest i with tile_starts[i] <= tile (binary search; empty sequences are skipped)."""
    lo = 0
    hi = num_seqs
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if tl.load(tile_starts_ptr + mid) <= tile:
            lo = mid
        else:
            hi = mid
    return lo


@jit
def _paged_prefill_attention_kernel(
        q_ptr, kv_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, tile_starts_ptr,
        out_ptr, qk_scale_log2, v_scale, num_seqs, stride_q_tok, stride_q_head,
        stride_kv_block, stride_kv_kv, stride_kv_tok, stride_kv_head, stride_table_seq,
        stride_out_tok, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        KV_BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr, KV_FP8: tl.constexpr):
    """Program (q tile, kv head): BLOCK_Q query tokens x GROUP heads, causal over the cache.

    Tiles are numbered across the whole packed batch: sequence i owns tiles
    tile_starts[i] .. tile_starts[i+1]-1, so no host sync is needed to size the grid.
    KV_FP8: fp8 K/V tiles upcast to q's dtype, k_scale inside qk_scale_log2, v_scale applied
    to the output (unused otherwise).
    """
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    if tile >= tl.load(tile_starts_ptr + num_seqs):
        return
    seq = _find_sequence(tile_starts_ptr, tile, num_seqs)
    q_start = tl.load(query_start_loc_ptr + seq)
    num_q = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    first_q = (tile - tl.load(tile_starts_ptr + seq)) * BLOCK_Q
    rows = tl.arange(0, BLOCK_M)
    q_idx = first_q + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < BLOCK_Q * GROUP) & (q_idx < num_q)
    q_pos = seq_len - num_q + q_idx
    dims = tl.arange(0, BLOCK_D)
    q_mask = row_mask[:, None] & (dims < HEAD_DIM)[None, :]
    q_rows = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_tok + heads[:, None] * stride_q_head
                + dims[None, :], mask=q_mask, other=0.0)
    if not KV_FP8:
        q = q.to(kv_ptr.dtype.element_ty)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    kv_head_ptr = kv_ptr + kv_head * stride_kv_head
    # Causal: nothing past this tile's last query position is visible.
    kv_end = seq_len - num_q + tl.minimum(first_q + BLOCK_Q, num_q)
    for tile_start in range(0, kv_end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        pos_mask = positions < kv_end
        offsets = token_offsets(table_row, positions, pos_mask, stride_kv_block, stride_kv_tok,
                                 KV_BLOCK_SIZE)
        ptrs = kv_head_ptr + offsets[:, None] + dims[None, :]
        tile_mask = pos_mask[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(ptrs, mask=tile_mask, other=0.0)
        v = tl.load(ptrs + stride_kv_kv, mask=tile_mask, other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        visible = pos_mask[None, :] & (positions[None, :] <= q_pos[:, None])
        m_i, l_i, acc = attend_tile(q, k, v, visible, m_i, l_i, acc, qk_scale_log2, UPCAST_DOT)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if KV_FP8:
        out = out * v_scale
    out_ptrs = (out_ptr + q_rows[:, None] * stride_out_tok + heads[:, None] * HEAD_DIM
                + dims[None, :])
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _prefill_blocks(group: int, arch: str | None) -> tuple[int, int, int, int, int]:
    """(BLOCK_M rows, BLOCK_Q tokens per tile, BLOCK_N, num_warps, num_stages)."""
    cfg = load_config(KERNEL, arch)
    block_m = max(get_int(cfg, "block_m"), next_power_of_2(group))
    return (block_m, block_m // group, get_int(cfg, "block_n"), get_int(cfg, "num_warps"),
            get_int(cfg, "num_stages"))


def paged_prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                            step_cache: StepCache | None = None) -> torch.Tensor:
    """Causal attention of packed query chunks over the paged cache, as the reference.

    q [T, Hq, D] packs B sequences by query_start_loc [B+1] int32; seq_lens [B] int32 counts
    cached prefix + chunk, all already in kv_layer [NB, 2, bs, Hk, D] (fp8: read as
    K * k_scale, V * v_scale). Covers prefill, chunked prefill and decode. Returns [T, Hq, D]
    in q's dtype. No host sync. ``step_cache``: the step's tile starts are built by the first
    layer and reused by the others (attention_tiles.tile_starts).
    Bytes moved (at least): 2 * T * Hq * D * elt + sum(seq_lens) * Hk * D * 2 * kv elt.
    """
    require_triton("paged_prefill_attention")
    group = check_attention_shapes("paged_prefill_attention", q, kv_layer)
    num_tokens, num_q_heads, head_dim = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m, block_q, block_n, num_warps, num_stages = _prefill_blocks(group, None)
    starts = tile_starts(query_start_loc, block_q, step_cache)
    grid = (cdiv(num_tokens, block_q) + num_seqs, kv_layer.shape[3])
    fp8 = is_fp8(kv_layer.dtype)
    _paged_prefill_attention_kernel[grid](
        q, kv_layer, block_tables, query_start_loc, seq_lens, starts, out,
        scale * (k_scale if fp8 else 1.0) * LOG2_E, v_scale, num_seqs, q.stride(0),
        q.stride(1), *kv_strides(kv_layer), block_tables.stride(0), num_q_heads * head_dim,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)),
        KV_BLOCK_SIZE=kv_layer.shape[2], BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        UPCAST_DOT=interpreter_upcasts_dot(q.dtype if fp8 else kv_layer.dtype), KV_FP8=fp8,
        num_warps=num_warps, num_stages=num_stages)
    return out


def aot_specs(arch: str) -> list[KernelSpec]:
    """bf16, head_dim 128, block size 16: Llama-3-8B (GROUP 4) and Llama-3-70B (GROUP 8);
    and GROUP 8 over an fp8 cache."""
    specs = []
    for group, fp8 in ((4, False), (8, False), (8, True)):
        block_m, block_q, block_n, num_warps, num_stages = _prefill_blocks(group, arch)
        cache = f"*{TRITON_FP8[fp8_kv_dtype_for(arch)]}" if fp8 else "*bf16"
        sig = {"q_ptr": "*bf16", "kv_ptr": cache, "block_tables_ptr": "*i32",
               "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32", "tile_starts_ptr": "*i32",
               "out_ptr": "*bf16", "qk_scale_log2": "fp32", "v_scale": "fp32",
               "num_seqs": "i32", "stride_q_tok": "i32", "stride_q_head": "i32",
               "stride_kv_block": "i32",
               "stride_kv_kv": "i32", "stride_kv_tok": "i32", "stride_kv_head": "i32",
               "stride_table_seq": "i32", "stride_out_tok": "i32"}
        constexprs = {"GROUP": group, "HEAD_DIM": 128, "BLOCK_D": 128, "KV_BLOCK_SIZE": 16,
                      "BLOCK_Q": block_q, "BLOCK_M": block_m, "BLOCK_N": block_n,
                      "UPCAST_DOT": False, "KV_FP8": fp8}
        sig.update({name: "constexpr" for name in constexprs})
        aligned = tuple(n for n in sig if n.startswith("stride") and n != "stride_table_seq")
        kv = "fp8" if fp8 else "bf16"
        specs.append(KernelSpec(name=f"{KERNEL}[{kv},g{group},d128,bs16]",
                                fn=_paged_prefill_attention_kernel, signature=sig,
                                constexprs=constexprs, aligned=aligned, num_warps=num_warps,
                                num_stages=num_stages))
    return specs
