"""The index of each row's largest logit (greedy decoding), in two short launches.

    logits [B, V] fp32 / bf16 / fp16 (rows may be strided; the last dim contiguous)
    ->     [B] int64, the first index of the row's maximum (torch.argmax's tie rule)

torch's argmax reduces a 128k-wide row in one block per row: 27 us at batch 1 and 40 us at
batch 64 on an H200 (bench/results/decode_profile.jsonl), about 0.6% of a decode step. Here the
first launch has (row, chunk) programs each reduce CHUNK columns to a (max, first index) pair,
and the second reduces each row's pairs. A NaN counts as +inf (a row with NaN logits is broken
anyway; torch would return the first NaN, this the first NaN or +inf).

Bytes moved: B * V * elt (read once) + 8 * B * chunks.
"""

from __future__ import annotations

import torch

from hip_kernels.launch_config import KernelSpec, get_int, load_config
from hip_kernels.triton_compat import cdiv, jit, next_power_of_2, require_triton, tl

KERNEL = "greedy_argmax"


def greedy_argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """The definition: torch.argmax over the last dim."""
    return logits.argmax(dim=-1)


@jit
def _argmax_chunk_kernel(x_ptr, val_ptr, idx_ptr, vocab, stride_row, num_chunks,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, chunk): the max of CHUNK columns and its first index."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 2147483647, tl.int32)
    for off in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + off + lanes
        v = tl.load(x_ptr + row * stride_row + cols, mask=cols < vocab,
                    other=float("-inf")).to(tl.float32)
        v = tl.where(v != v, float("inf"), v)
        # strict: a lane keeps its earliest column among equal values
        take = (v > best) | ((best_idx == 2147483647) & (cols < vocab))
        best = tl.where(take, v, best)
        best_idx = tl.where(take, cols, best_idx)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
    tl.store(val_ptr + row * num_chunks + chunk, top)
    tl.store(idx_ptr + row * num_chunks + chunk, first)


@jit
def _argmax_rows_kernel(val_ptr, idx_ptr, out_ptr, num_chunks, BLOCK_CHUNKS: tl.constexpr):
    """Program row: the first index of the row's max over its chunks' pairs."""
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, BLOCK_CHUNKS)
    mask = chunks < num_chunks
    v = tl.load(val_ptr + row * num_chunks + chunks, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * num_chunks + chunks, mask=mask, other=2147483647)
    top = tl.max(v, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(mask & (v == top), i, 2147483647), axis=0)
             .to(tl.int64))


def _plan(arch: str | None) -> tuple[int, int, int]:
    """(CHUNK, BLOCK, num_warps) from the arch's config."""
    cfg = load_config(KERNEL, arch)
    return get_int(cfg, "chunk"), get_int(cfg, "block"), get_int(cfg, "num_warps")


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``greedy_argmax_ref`` of [B, V] logits (V < 2**31) in two launches; no host sync."""
    require_triton(KERNEL)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"greedy_argmax: logits must be [B, V] with V > 0, got "
                         f"{tuple(logits.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return out
    chunk, block, num_warps = _plan(None)
    block = min(block, chunk)
    num_chunks = cdiv(vocab, chunk)
    vals = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    _argmax_chunk_kernel[(rows, num_chunks)](logits, vals, idxs, vocab, logits.stride(0),
                                             num_chunks, CHUNK=chunk, BLOCK=block,
                                             num_warps=num_warps)
    _argmax_rows_kernel[(rows,)](vals, idxs, out, num_chunks,
                                 BLOCK_CHUNKS=next_power_of_2(num_chunks))
    return out


def aot_specs(arch: str) -> list[KernelSpec]:
    """Llama-3's 128256-wide fp32 logits: the chunk pass and the row pass."""
    chunk, block, num_warps = _plan(arch)
    block = min(block, chunk)
    chunk_sig = {"x_ptr": "*fp32", "val_ptr": "*fp32", "idx_ptr": "*i32", "vocab": "i32",
                 "stride_row": "i32", "num_chunks": "i32", "CHUNK": "constexpr",
                 "BLOCK": "constexpr"}
    rows_sig = {"val_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*i64", "num_chunks": "i32",
                "BLOCK_CHUNKS": "constexpr"}
    return [KernelSpec(name=f"{KERNEL}[chunk,fp32,c{chunk}b{block}]", fn=_argmax_chunk_kernel,
                       signature=chunk_sig, constexprs={"CHUNK": chunk, "BLOCK": block},
                       aligned=("stride_row",), num_warps=num_warps),
            KernelSpec(name=f"{KERNEL}[rows]", fn=_argmax_rows_kernel, signature=rows_sig,
                       constexprs={"BLOCK_CHUNKS": next_power_of_2(cdiv(128256, chunk))},
                       num_warps=1)]
