"""Gather/scatter whole KV blocks between the paged cache and a contiguous staging buffer.

    kv_cache [NB, <block tail>]          staging [n, <block tail>]
    block b = one contiguous run of block_numel elements (all layers, K and V)
    gather:  staging[i] <- kv_cache[block_ids[i]]      scatter: kv_cache[block_ids[i]] <- staging[i]

Each program copies one chunk of one block, so the copy is a flat, fully coalesced stream.

``copy_segments`` is the transports' batched copy: many (src offset, dst offset, length) runs of
one flat region into another, in ONE launch, where one ``copy_`` per run pays a launch and a
stream handshake each (the ipc transport moved 256 scattered 2 MiB blocks at ~20 % of the
peer-copy rate that way). Either region may be another GPU's memory mapped into this process
(CUDA/HIP IPC, peer access enabled): the kernel then pulls or pushes over NVLink / xGMI.

    runs are cut host-side into chunks of at most ``copy_chunk`` words:
    table [3, n_chunks] int64 = (src word offset, dst word offset, words)
    program c:  dst[table[1, c] : + table[2, c]] <- src[table[0, c] : + table[2, c]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hip_kernels.launch_config import KernelSpec, get_int, load_config
from hip_kernels.triton_compat import cdiv, jit, require_triton, tl

KERNEL = "kv_blocks"


def _as_bytes(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same 1-byte dtype on both sides (an fp8 cache): uint8 views, since torch's CPU
    index_select / index_copy_ have no fp8 kernels; the copy is of bytes either way."""
    if src.dtype == dst.dtype and src.element_size() == 1:
        return src.view(torch.uint8), dst.view(torch.uint8)
    return src, dst


def gather_kv_blocks_ref(kv_cache: torch.Tensor, block_ids: torch.Tensor,
                         staging: torch.Tensor) -> None:
    """staging[i] = kv_cache[block_ids[i]]; kv_cache [NB, ...], staging [n, ...] same tail."""
    src, dst = _as_bytes(kv_cache, staging)
    dst.copy_(src.index_select(0, block_ids.long()))


def scatter_kv_blocks_ref(staging: torch.Tensor, block_ids: torch.Tensor,
                          kv_cache: torch.Tensor) -> None:
    """kv_cache[block_ids[i]] = staging[i] (in place)."""
    src, dst = _as_bytes(staging, kv_cache)
    dst.index_copy_(0, block_ids.long(), src.to(dst.dtype))


@jit
def _copy_chunk(src_row_ptr, dst_row_ptr, block_numel, BLOCK: tl.constexpr):
    """Copy elements [chunk * BLOCK, (chunk + 1) * BLOCK) of one block, casting to dst's dtype."""
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    x = tl.load(src_row_ptr + offs, mask=mask)
    tl.store(dst_row_ptr + offs, x.to(dst_row_ptr.dtype.element_ty), mask=mask)


@jit
def _gather_kv_blocks_kernel(cache_ptr, block_ids_ptr, staging_ptr, block_numel,
                             stride_cache_block, stride_staging_block, BLOCK: tl.constexpr):
    """Program (i, chunk): staging[i][chunk] <- kv_cache[block_ids[i]][chunk]."""
    i = tl.program_id(0).to(tl.int64)
    block_id = tl.load(block_ids_ptr + i).to(tl.int64)
    _copy_chunk(cache_ptr + block_id * stride_cache_block, staging_ptr + i * stride_staging_block,
                block_numel, BLOCK)


@jit
def _scatter_kv_blocks_kernel(staging_ptr, block_ids_ptr, cache_ptr, block_numel,
                              stride_staging_block, stride_cache_block, BLOCK: tl.constexpr):
    """Program (i, chunk): kv_cache[block_ids[i]][chunk] <- staging[i][chunk]."""
    i = tl.program_id(0).to(tl.int64)
    block_id = tl.load(block_ids_ptr + i).to(tl.int64)
    _copy_chunk(staging_ptr + i * stride_staging_block, cache_ptr + block_id * stride_cache_block,
                block_numel, BLOCK)


def _flat_blocks(t: torch.Tensor) -> bool:
    """True if every block (t[i]) is one contiguous run of elements."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _plan(arch: str | None) -> tuple[int, int]:
    """(BLOCK elements per program, num_warps)."""
    cfg = load_config(KERNEL, arch)
    return get_int(cfg, "block"), get_int(cfg, "num_warps")


def _check(kv_cache: torch.Tensor, block_ids: torch.Tensor, staging: torch.Tensor) -> None:
    """Raise a clear error when staging is not len(block_ids) blocks shaped like the cache's."""
    if staging.shape[1:] != kv_cache.shape[1:] or staging.shape[0] != block_ids.shape[0]:
        raise ValueError(f"kv blocks: staging {tuple(staging.shape)} is not "
                         f"{block_ids.shape[0]} blocks of kv_cache {tuple(kv_cache.shape)}")


def _launch(kernel: Any, src: torch.Tensor, block_ids: torch.Tensor, dst: torch.Tensor) -> None:
    """Launch a gather or scatter kernel over len(block_ids) blocks, src -> dst."""
    block_numel = math.prod(src.shape[1:])
    if block_ids.shape[0] == 0 or block_numel == 0:
        return
    block, num_warps = _plan(None)
    grid = (block_ids.shape[0], cdiv(block_numel, block))
    kernel[grid](src, block_ids, dst, block_numel, src.stride(0), dst.stride(0),
                 BLOCK=block, num_warps=num_warps)


def gather_kv_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor,
                     staging: torch.Tensor) -> None:
    """staging[i] = kv_cache[block_ids[i]] for a cache whose blocks are contiguous runs.

    kv_cache [NB, ...] (e.g. [NB, L, 2, bs, Hk, D]), staging [n, ...] same tail, block_ids [n]
    int. Casts to staging's dtype. Layouts whose blocks are not flat runs take the reference.
    Bytes moved: 2 * n * block_numel * elt.
    """
    require_triton("gather_kv_blocks")
    _check(kv_cache, block_ids, staging)
    if not (_flat_blocks(kv_cache) and _flat_blocks(staging)):
        gather_kv_blocks_ref(kv_cache, block_ids, staging)
        return
    _launch(_gather_kv_blocks_kernel, kv_cache, block_ids, staging)


def scatter_kv_blocks(staging: torch.Tensor, block_ids: torch.Tensor,
                      kv_cache: torch.Tensor) -> None:
    """kv_cache[block_ids[i]] = staging[i] in place; the inverse of ``gather_kv_blocks``.

    Same shapes and layout rule; casts to the cache dtype. Duplicate block ids: one of the
    writes wins. Bytes moved: 2 * n * block_numel * elt.
    """
    require_triton("scatter_kv_blocks")
    _check(kv_cache, block_ids, staging)
    if not (_flat_blocks(kv_cache) and _flat_blocks(staging)):
        scatter_kv_blocks_ref(staging, block_ids, kv_cache)
        return
    _launch(_scatter_kv_blocks_kernel, staging, block_ids, kv_cache)


COPY_ALIGN_BYTES = 64
"""Runs whose offsets and lengths are multiples of this take the kernel (16 int32 words each,
so every load and store is a full 128-bit vector); others take ``copy_segments_ref``."""


def copy_segments_ref(src: torch.Tensor, dst: torch.Tensor,
                      runs: Sequence[tuple[int, int, int]]) -> None:
    """dst[d:d+n] = src[s:s+n] for each (s, d, n) byte run; src and dst flat uint8 tensors."""
    for s, d, n in runs:
        dst[d:d + n].copy_(src[s:s + n], non_blocking=True)


def segments_aligned(runs: Sequence[tuple[int, int, int]]) -> bool:
    """True if every run's offsets and length are multiples of COPY_ALIGN_BYTES."""
    return all(s % COPY_ALIGN_BYTES == 0 and d % COPY_ALIGN_BYTES == 0
               and n % COPY_ALIGN_BYTES == 0 for s, d, n in runs)


def chunk_table(runs: Sequence[tuple[int, int, int]], word_bytes: int,
                chunk_words: int) -> np.ndarray:
    """[3, n_chunks] int64 of (src word, dst word, words): every run cut into chunks."""
    if not runs:
        return np.zeros((3, 0), dtype=np.int64)
    arr = np.asarray(runs, dtype=np.int64) // word_bytes
    pieces = -(-arr[:, 2] // chunk_words)
    run_of = np.repeat(np.arange(len(arr)), pieces)
    first = np.cumsum(pieces) - pieces
    within = (np.arange(int(pieces.sum())) - np.repeat(first, pieces)) * chunk_words
    words = np.minimum(arr[run_of, 2] - within, chunk_words)
    return np.stack([arr[run_of, 0] + within, arr[run_of, 1] + within, words])


@jit
def _copy_segments_kernel(src_ptr, dst_ptr, table_ptr, num_chunks,
                          BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Program c copies chunk c: table[2, c] (<= CHUNK) words, BLOCK words per step."""
    c = tl.program_id(0).to(tl.int64)
    s = tl.multiple_of(tl.load(table_ptr + c), 16)
    d = tl.multiple_of(tl.load(table_ptr + num_chunks + c), 16)
    n = tl.multiple_of(tl.load(table_ptr + 2 * num_chunks + c), 16)
    for start in tl.static_range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(src_ptr + s + offs, mask=mask)
        tl.store(dst_ptr + d + offs, x, mask=mask)


def _copy_plan(arch: str | None) -> tuple[int, int, int]:
    """(BLOCK words per step, CHUNK words per program, num_warps)."""
    cfg = load_config(KERNEL, arch)
    return get_int(cfg, "copy_block"), get_int(cfg, "copy_chunk"), get_int(cfg, "copy_num_warps")


def copy_segments(src: torch.Tensor, dst: torch.Tensor,
                  runs: Sequence[tuple[int, int, int]]) -> None:
    """dst[d:d+n] = src[s:s+n] for each (s, d, n) byte run, in one kernel launch.

    ``src`` and ``dst`` are flat uint8 tensors (either may be a peer GPU's IPC-mapped memory;
    the kernel runs on the current device and stream). Runs that are not all 64-byte aligned
    take ``copy_segments_ref``. Runs must not overlap on the destination. Bytes moved: 2 * sum(n).
    """
    require_triton("copy_segments")
    if src.dtype != torch.uint8 or dst.dtype != torch.uint8 or src.dim() != 1 or dst.dim() != 1:
        raise ValueError("copy_segments: src and dst must be flat uint8 tensors")
    if not runs:
        return
    for s, d, n in runs:
        if s < 0 or d < 0 or n < 0 or s + n > src.numel() or d + n > dst.numel():
            raise ValueError(f"copy_segments: run ({s}, {d}, {n}) is outside src "
                             f"({src.numel()} B) or dst ({dst.numel()} B)")
    if not (segments_aligned(runs) and src.data_ptr() % COPY_ALIGN_BYTES == 0
            and dst.data_ptr() % COPY_ALIGN_BYTES == 0):
        copy_segments_ref(src, dst, runs)
        return
    block, chunk, num_warps = _copy_plan(None)
    on_gpu = src.is_cuda or dst.is_cuda
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else src.device
    table = torch.from_numpy(chunk_table(runs, 4, chunk))
    # pinned + non_blocking: no host stall (torch keeps the pinned block until the copy ran)
    table = table.pin_memory().to(device, non_blocking=True) if on_gpu else table
    num_chunks = table.shape[1]
    _copy_segments_kernel[(num_chunks,)](src.view(torch.int32), dst.view(torch.int32), table,
                                         num_chunks, BLOCK=block, CHUNK=chunk,
                                         num_warps=num_warps)


def aot_specs(arch: str) -> list[KernelSpec]:
    """bf16 Llama-3-8B blocks (32 layers x 2 x 16 x 8 x 128 = 1 Mi elements)."""
    block, num_warps = _plan(arch)
    specs = []
    for name, fn, params in (
            ("gather_kv_blocks", _gather_kv_blocks_kernel,
             ("cache_ptr", "block_ids_ptr", "staging_ptr", "block_numel",
              "stride_cache_block", "stride_staging_block")),
            ("scatter_kv_blocks", _scatter_kv_blocks_kernel,
             ("staging_ptr", "block_ids_ptr", "cache_ptr", "block_numel",
              "stride_staging_block", "stride_cache_block"))):
        sig = {p: ("*i32" if p == "block_ids_ptr" else "*bf16") if p.endswith("_ptr") else "i32"
               for p in params}
        sig["BLOCK"] = "constexpr"
        specs.append(KernelSpec(name=f"{name}[bf16,1Mi]", fn=fn, signature=sig,
                                constexprs={"BLOCK": block},
                                aligned=tuple(p for p in params if not p.endswith("_ptr")),
                                num_warps=num_warps))
    copy_block, copy_chunk, copy_warps = _copy_plan(arch)
    specs.append(KernelSpec(
        name="copy_segments[i32]", fn=_copy_segments_kernel,
        signature={"src_ptr": "*i32", "dst_ptr": "*i32", "table_ptr": "*i64", "num_chunks": "i32",
                   "BLOCK": "constexpr", "CHUNK": "constexpr"},
        constexprs={"BLOCK": copy_block, "CHUNK": copy_chunk}, num_warps=copy_warps))
    return specs
