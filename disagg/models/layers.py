"""Pieces every attention flavour shares: the step's cache metadata and the RMSNorm layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from disagg.models.ops import Ops

LayerHook = Callable[[int], None]
"""Called with a layer's index right after that layer wrote this step's K/V into the cache."""


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where this step's tokens sit in the paged cache (the explicit forward context)."""

    slot_mapping: torch.Tensor
    """[T] int64: cache slot of each token (block_id * block_size + offset)."""
    block_tables: torch.Tensor
    """[B, max_blocks] int32: block ids of each sequence."""
    seq_lens: torch.Tensor
    """[B] int32: tokens in the cache for each sequence after this step."""
    query_start_loc: torch.Tensor
    """[B+1] int32: row ranges of each sequence in the flattened batch."""
    decode_only: bool
    """Every sequence contributes exactly one query token."""
    layer_hook: LayerHook | None = None
    """Eager steps only (never a captured graph): e.g. a KV connector streaming each layer out."""
    host_query_start_loc: tuple[int, ...] | None = None
    host_seq_lens: tuple[int, ...] | None = None
    """``query_start_loc`` and ``seq_lens`` as the host built them (eager steps): a layer that
    sizes work per sequence reads these instead of copying the device tensors back (a sync
    per layer). None where only the tensors exist (graphs, profiling)."""
    step_cache: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, compare=False)
    """Tensors a kernel derives from this metadata, built by the first layer and reused by the
    rest of the step (e.g. the prefill kernel's tile starts)."""


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale."""

    def __init__(self, size: int, eps: float, ops: Ops) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dimension."""
        return self.ops.rms_norm(x, self.weight, self.eps)
