"""Which rank moves which KV heads to which rank, when P and D run different TP sizes.

Each rank holds the KV heads ``kv_head_range(H, tp, rank)`` gives (disagg/models/parallel.py):
H / tp consecutive heads, or, with tp > H, one head replicated on tp / H ranks. A transfer is a
list of routes; every consumer (decode) rank gets each head it holds exactly once, from one
producer rank that holds it (replicas take turns), so with a replicating producer one copy
moves, not several. READ: each D rank posts its routes (pulls); WRITE: each P rank posts its
routes (pushes). Same TP on both sides: rank i <-> rank i, whole blocks.

    P tp=2 (H=2: p0 {0}, p1 {1})   D tp=4 (d0 {0}, d1 {0}, d2 {1}, d3 {1})
    routes: p0->d0 h0, p0->d1 h0, p1->d2 h1, p1->d3 h1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connectors.transports.base import merge_array
from disagg.models.parallel import kv_head_range


@dataclass(frozen=True, slots=True)
class Route:
    """Heads [producer_head, +num_heads) of producer rank -> [consumer_head, ...) of consumer
    rank (offsets inside each rank's own head range)."""

    producer_rank: int
    consumer_rank: int
    producer_head: int
    consumer_head: int
    num_heads: int


@dataclass(frozen=True, slots=True)
class RankGeometry:
    """The shape of one side's per-rank cache blocks."""

    num_layers: int
    block_size: int
    heads_per_rank: int
    head_bytes: int
    """head_dim * element size."""

    @property
    def block_bytes(self) -> int:
        return self.num_layers * 2 * self.block_size * self.heads_per_rank * self.head_bytes


def routes(num_kv_heads: int, producer_tp: int, consumer_tp: int) -> list[Route]:
    """Every consumer rank's heads, each from one producer rank holding it."""
    holders: dict[int, list[int]] = {}
    for p in range(producer_tp):
        start, n = kv_head_range(num_kv_heads, producer_tp, p)
        for h in range(start, start + n):
            holders.setdefault(h, []).append(p)
    out: list[Route] = []
    for c in range(consumer_tp):
        start, n = kv_head_range(num_kv_heads, consumer_tp, c)
        for h in range(start, start + n):
            p = holders[h][c % len(holders[h])]
            p_start = kv_head_range(num_kv_heads, producer_tp, p)[0]
            last = out[-1] if out else None
            if (last is not None and last.consumer_rank == c and last.producer_rank == p
                    and last.consumer_head + last.num_heads == h - start
                    and last.producer_head + last.num_heads == h - p_start):
                out[-1] = Route(p, c, last.producer_head, last.consumer_head,
                                last.num_heads + 1)
            else:
                out.append(Route(p, c, h - p_start, h - start, 1))
    return out


def route_rows(local_blocks: list[int], remote_blocks: list[int], local: RankGeometry,
               remote: RankGeometry, local_head: int, remote_head: int,
               num_heads: int) -> np.ndarray:
    """(local, remote, length) byte rows moving heads [local_head, +num_heads) of every
    (layer, K/V, token) of each block pair; whole blocks (one merged run per block pair) when
    both sides hold exactly these heads."""
    n = min(len(local_blocks), len(remote_blocks))
    lb = np.asarray(local_blocks[:n], dtype=np.int64)
    rb = np.asarray(remote_blocks[:n], dtype=np.int64)
    top = int(max(lb.max(initial=0), rb.max(initial=0)))
    if int(min(lb.min(initial=0), rb.min(initial=0))) < 0 or \
            (top + 1) * max(local.block_bytes, remote.block_bytes) >= 2**62:
        raise ValueError(f"block id {top} is out of range for "
                         f"{max(local.block_bytes, remote.block_bytes)}-byte blocks")
    whole = num_heads == local.heads_per_rank == remote.heads_per_rank
    if whole:
        rows = np.empty((n, 3), dtype=np.int64)
        rows[:, 0], rows[:, 1], rows[:, 2] = lb * local.block_bytes, rb * remote.block_bytes, \
            local.block_bytes
        return merge_array(rows)
    runs = local.num_layers * 2 * local.block_size  # (layer, K/V, token) runs per block
    idx = np.arange(runs, dtype=np.int64)
    l_off = idx * local.heads_per_rank * local.head_bytes + local_head * local.head_bytes
    r_off = idx * remote.heads_per_rank * remote.head_bytes + remote_head * remote.head_bytes
    rows = np.empty((n, runs, 3), dtype=np.int64)
    rows[:, :, 0] = lb[:, None] * local.block_bytes + l_off[None, :]
    rows[:, :, 1] = rb[:, None] * remote.block_bytes + r_off[None, :]
    rows[:, :, 2] = num_heads * local.head_bytes
    return merge_array(rows.reshape(-1, 3))
