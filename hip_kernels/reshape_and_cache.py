"""Write new K/V rows into the paged cache by slot mapping."""

from __future__ import annotations

import torch


def reshape_and_cache_ref(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Scatter key/value [T, Hk, D] into kv_layer [NB, 2, bs, Hk, D] at slot_mapping [T] (int).

    In place. Every slot is valid (0 <= slot < NB * bs). Bytes moved: 2 * 2 * T * Hk * D * elt.
    """
    block_size = kv_layer.shape[2]
    slots = slot_mapping.long()
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots % block_size
    kv_layer[blocks, 0, offsets] = key.to(kv_layer.dtype)
    kv_layer[blocks, 1, offsets] = value.to(kv_layer.dtype)
