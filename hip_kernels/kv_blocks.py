"""Gather/scatter whole KV blocks between the paged cache and a contiguous staging buffer."""

from __future__ import annotations

import torch


def gather_kv_blocks_ref(kv_cache: torch.Tensor, block_ids: torch.Tensor,
                         staging: torch.Tensor) -> None:
    """staging[i] = kv_cache[block_ids[i]]; kv_cache [NB, ...], staging [n, ...] same tail."""
    staging.copy_(kv_cache.index_select(0, block_ids.long()))


def scatter_kv_blocks_ref(staging: torch.Tensor, block_ids: torch.Tensor,
                          kv_cache: torch.Tensor) -> None:
    """kv_cache[block_ids[i]] = staging[i] (in place)."""
    kv_cache.index_copy_(0, block_ids.long(), staging.to(kv_cache.dtype))
