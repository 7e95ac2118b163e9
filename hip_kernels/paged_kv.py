"""Synthetic paged KV caches (random K/V in scattered blocks) for kernel checks and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class PagedKV:
    """A whole multi-layer cache, one layer's strided view of it, and the batch's block tables."""

    kv_cache: torch.Tensor
    """[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]"""
    kv_layer: torch.Tensor
    """kv_cache[:, layer]: block stride is the whole cache's."""
    block_tables: torch.Tensor
    """[B, max_blocks + 1] int32; each sequence's blocks are distinct and scattered."""
    seq_lens: torch.Tensor
    """[B] int32"""


def make_paged_kv(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                  dtype: torch.dtype, device: str = "cpu", num_layers: int = 2,
                  seed: int = 0) -> PagedKV:
    """Random K/V for sequences of ``seq_lens`` tokens in shuffled blocks of a fresh cache."""
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    order = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    width = max(per_seq, default=0) + 1
    # Unused table entries point at real blocks too: a kernel must not read past seq_len.
    block_tables = order[torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen,
                                       device=device)]
    start = 0
    for i, count in enumerate(per_seq):
        block_tables[i, :count] = order[start:start + count]
        start += count
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return PagedKV(kv_cache, kv_cache[:, num_layers - 1], block_tables, lens)
