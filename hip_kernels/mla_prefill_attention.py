"""Causal attention of MLA prompt chunks over their up-projected context (DeepSeek prefill).

A step with prompt tokens up-projects each sequence's cached latents to per-head keys and
values (disagg/models/mla.py); the rope part of the key is one vector per position shared by
every head. Scores split along the two parts, so neither is padded to the other's width and the
shared rope key is never expanded per head:

    s[t, j] = q_nope[t, h] . k_nope[j, h] + q_pe[t, h] . k_pe[j]        (times scale)
    o[t, h] = softmax_j(s) v[j, h]          causal: key j visible to query t iff j <= pos(t)

Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1] and key rows
kv_start_loc[i]:kv_start_loc[i+1]; its queries are the last positions of its keys (a chunk
after a cached prefix). Program (q tile, head): BLOCK_M query tokens of one sequence; tiles are
numbered across the packed batch by a device-side prefix sum, so no host sync sizes the grid.
"""

from __future__ import annotations

import torch

from hip_kernels.attention_tiles import LOG2_E, tile_starts
from hip_kernels.launch_config import KernelSpec, get_int, load_config
from hip_kernels.paged_prefill_attention import _find_sequence
from hip_kernels.triton_compat import (
    cdiv,
    interpreter_upcasts_dot,
    jit,
    next_power_of_2,
    require_triton,
    tl,
)

KERNEL = "mla_prefill_attention"


def mla_prefill_attention_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor,
                              k_pe: torch.Tensor, v: torch.Tensor,
                              query_start_loc: torch.Tensor, kv_start_loc: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """q_nope [T, H, N], q_pe [T, H, R], k_nope [S, H, N], k_pe [S, R], v [S, H, V];
    query_start_loc and kv_start_loc int [B+1]. Returns [T, H, V] in q_nope's dtype (math in
    fp32 or wider; the scores of one sequence at a time)."""
    out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], v.shape[2])
    acc = torch.promote_types(q_nope.dtype, torch.float32)
    q_starts, kv_starts = query_start_loc.tolist(), kv_start_loc.tolist()
    for i in range(len(q_starts) - 1):
        lo, hi = q_starts[i], q_starts[i + 1]
        k_lo, k_hi = kv_starts[i], kv_starts[i + 1]
        if hi == lo:
            continue
        scores = torch.einsum("qhd,khd->hqk", q_nope[lo:hi].to(acc), k_nope[k_lo:k_hi].to(acc))
        scores += torch.einsum("qhd,kd->hqk", q_pe[lo:hi].to(acc), k_pe[k_lo:k_hi].to(acc))
        seq_len, first = k_hi - k_lo, (k_hi - k_lo) - (hi - lo)
        hidden = torch.arange(seq_len, device=q_nope.device)[None, :] > (
            torch.arange(hi - lo, device=q_nope.device)[:, None] + first)
        probs = (scores * scale).masked_fill(hidden, float("-inf")).softmax(dim=-1)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", probs, v[k_lo:k_hi].to(acc)).to(out.dtype)
    return out


@jit
def _mla_prefill_kernel(
        q_nope_ptr, q_pe_ptr, k_nope_ptr, k_pe_ptr, v_ptr, query_start_loc_ptr, kv_start_loc_ptr,
        tile_starts_ptr, out_ptr, qk_scale_log2, num_seqs, stride_qn_tok, stride_qn_head,
        stride_qp_tok, stride_qp_head, stride_kn_tok, stride_kn_head, stride_kp_tok,
        stride_v_tok, stride_v_head, stride_out_tok, stride_out_head,
        NOPE_DIM: tl.constexpr, ROPE_DIM: tl.constexpr, V_DIM: tl.constexpr,
        BLOCK_NOPE: tl.constexpr, BLOCK_ROPE: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Program (q tile, head): BLOCK_M queries of one sequence, online softmax over its keys."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    if tile >= tl.load(tile_starts_ptr + num_seqs):
        return
    seq = _find_sequence(tile_starts_ptr, tile, num_seqs)
    q_start = tl.load(query_start_loc_ptr + seq)
    num_q = tl.load(query_start_loc_ptr + seq + 1) - q_start
    kv_start = tl.load(kv_start_loc_ptr + seq)
    seq_len = tl.load(kv_start_loc_ptr + seq + 1) - kv_start
    first_q = (tile - tl.load(tile_starts_ptr + seq)) * BLOCK_M
    q_idx = first_q + tl.arange(0, BLOCK_M)
    q_valid = q_idx < num_q
    q_pos = seq_len - num_q + q_idx
    q_rows = (q_start + q_idx).to(tl.int64)
    dn = tl.arange(0, BLOCK_NOPE)
    dr = tl.arange(0, BLOCK_ROPE)
    dv = tl.arange(0, BLOCK_V)
    q_n = tl.load(q_nope_ptr + q_rows[:, None] * stride_qn_tok + head * stride_qn_head
                  + dn[None, :], mask=q_valid[:, None] & (dn < NOPE_DIM)[None, :], other=0.0)
    q_p = tl.load(q_pe_ptr + q_rows[:, None] * stride_qp_tok + head * stride_qp_head
                  + dr[None, :], mask=q_valid[:, None] & (dr < ROPE_DIM)[None, :], other=0.0)
    if UPCAST_DOT:
        q_n = q_n.to(tl.float32)
        q_p = q_p.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    # Causal: nothing past this tile's last query position is visible.
    kv_end = seq_len - num_q + tl.minimum(first_q + BLOCK_M, num_q)
    for tile_start in range(0, kv_end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        pos_mask = positions < kv_end
        k_rows = (kv_start + positions).to(tl.int64)
        k_n = tl.load(k_nope_ptr + k_rows[:, None] * stride_kn_tok + head * stride_kn_head
                      + dn[None, :], mask=pos_mask[:, None] & (dn < NOPE_DIM)[None, :],
                      other=0.0)
        k_p = tl.load(k_pe_ptr + k_rows[:, None] * stride_kp_tok + dr[None, :],
                      mask=pos_mask[:, None] & (dr < ROPE_DIM)[None, :], other=0.0)
        v = tl.load(v_ptr + k_rows[:, None] * stride_v_tok + head * stride_v_head + dv[None, :],
                    mask=pos_mask[:, None] & (dv < V_DIM)[None, :], other=0.0)
        if UPCAST_DOT:
            k_n = k_n.to(tl.float32)
            k_p = k_p.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q_n, tl.trans(k_n), input_precision="ieee")
        s += tl.dot(q_p, tl.trans(k_p), input_precision="ieee")
        s = s * qk_scale_log2
        visible = pos_mask[None, :] & (positions[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_out_tok + head * stride_out_head + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_valid[:, None] & (dv < V_DIM)[None, :])


def _blocks(arch: str | None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    cfg = load_config(KERNEL, arch)
    return (get_int(cfg, "block_m"), get_int(cfg, "block_n"), get_int(cfg, "num_warps"),
            get_int(cfg, "num_stages"))


def _check(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
           v: torch.Tensor) -> None:
    heads = q_nope.shape[1]
    if (q_pe.shape[:2] != q_nope.shape[:2] or k_nope.shape[1:] != q_nope.shape[1:]
            or k_pe.shape != (k_nope.shape[0], q_pe.shape[2])
            or v.shape[:2] != (k_nope.shape[0], heads)):
        raise ValueError(
            f"mla_prefill_attention: shapes q_nope {tuple(q_nope.shape)}, q_pe "
            f"{tuple(q_pe.shape)}, k_nope {tuple(k_nope.shape)}, k_pe {tuple(k_pe.shape)}, "
            f"v {tuple(v.shape)} are not [T,H,N], [T,H,R], [S,H,N], [S,R], [S,H,V]")
    if any(t.stride(-1) != 1 for t in (q_nope, q_pe, k_nope, k_pe, v)):
        raise ValueError("mla_prefill_attention: every input's last dim must be contiguous")


def mla_prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor,
                          k_pe: torch.Tensor, v: torch.Tensor, query_start_loc: torch.Tensor,
                          kv_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference's result on the GPU (inputs may be strided views of fused projections;
    int32 start locations). No host sync. FLOPs (causal, fresh prompt of n): about
    n^2 * H * (N + R + V); bytes: the inputs once per q tile."""
    require_triton("mla_prefill_attention")
    _check(q_nope, q_pe, k_nope, k_pe, v)
    num_tokens, heads = q_nope.shape[:2]
    out = torch.empty((num_tokens, heads, v.shape[2]), dtype=q_nope.dtype, device=q_nope.device)
    num_seqs = query_start_loc.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m, block_n, num_warps, num_stages = _blocks(None)
    starts = tile_starts(query_start_loc, block_m)
    nope, rope, v_dim = q_nope.shape[2], q_pe.shape[2], v.shape[2]
    _mla_prefill_kernel[(cdiv(num_tokens, block_m) + num_seqs, heads)](
        q_nope, q_pe, k_nope, k_pe, v, query_start_loc, kv_start_loc, starts, out,
        scale * LOG2_E, num_seqs, q_nope.stride(0), q_nope.stride(1), q_pe.stride(0),
        q_pe.stride(1), k_nope.stride(0), k_nope.stride(1), k_pe.stride(0), v.stride(0),
        v.stride(1), out.stride(0), out.stride(1), NOPE_DIM=nope, ROPE_DIM=rope, V_DIM=v_dim,
        BLOCK_NOPE=max(16, next_power_of_2(nope)), BLOCK_ROPE=max(16, next_power_of_2(rope)),
        BLOCK_V=max(16, next_power_of_2(v_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        UPCAST_DOT=interpreter_upcasts_dot(v.dtype), num_warps=num_warps,
        num_stages=num_stages)
    return out


def aot_specs(arch: str) -> list[KernelSpec]:
    """bf16, DeepSeek-V2/V3 dims (nope 128, rope 64, v 128) as views of the fused projections:
    q [T, H, 192], kv_b output [S, H, 256], k_pe a slice of the kv_a output [S, 576]."""
    block_m, block_n, num_warps, num_stages = _blocks(arch)
    names = ("q_nope_ptr", "q_pe_ptr", "k_nope_ptr", "k_pe_ptr", "v_ptr")
    sig = {name: "*bf16" for name in names}
    sig.update({"query_start_loc_ptr": "*i32", "kv_start_loc_ptr": "*i32",
                "tile_starts_ptr": "*i32", "out_ptr": "*bf16", "qk_scale_log2": "fp32",
                "num_seqs": "i32"})
    strides = ("stride_qn_tok", "stride_qn_head", "stride_qp_tok", "stride_qp_head",
               "stride_kn_tok", "stride_kn_head", "stride_kp_tok", "stride_v_tok",
               "stride_v_head", "stride_out_tok", "stride_out_head")
    sig.update({name: "i32" for name in strides})
    constexprs = {"NOPE_DIM": 128, "ROPE_DIM": 64, "V_DIM": 128, "BLOCK_NOPE": 128,
                  "BLOCK_ROPE": 64, "BLOCK_V": 128, "BLOCK_M": block_m, "BLOCK_N": block_n,
                  "UPCAST_DOT": False}
    sig.update({name: "constexpr" for name in constexprs})
    return [KernelSpec(name=f"{KERNEL}[bf16,nope128,rope64,v128]", fn=_mla_prefill_kernel,
                       signature=sig, constexprs=constexprs, aligned=strides,
                       num_warps=num_warps, num_stages=num_stages,
                       launch={"grid": "(ceil(T / BLOCK_M) + B, heads)"})]
