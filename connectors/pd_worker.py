"""Worker side of the P/D connector: one transfer fanned out over this engine's TP ranks.

Each rank has its own KV tensor and transport endpoint (connectors/pd_rank.py); a peer's ranks
are named ``<engine id>#r<rank>`` to the transports. A transfer is posted as one op per
(local rank, peer rank) route (connectors/pd_heads.py) and reported as one op id here:

    poll   FAILED as soon as any part failed (the connector then releases the op, which
           cancels every other part: no partially-loaded request runs); DONE only when every
           part, on every rank, is DONE; PENDING otherwise.

Same TP size on both sides and one rank each: one part, whole blocks, as without TP. Memory
layout of one rank's blocks (blocks outermost, see hip_kernels/__init__.py): block b is the
byte run [b * block_bytes, (b + 1) * block_bytes) of the registered region, all layers, K and V,
so moving a whole block is one segment and runs of consecutive blocks merge into one:

    block b:  | layer 0: K V | layer 1: K V | ... | layer L-1: K V |
              ^ b * block_bytes               ^ + l * layer_bytes, layer_bytes long
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from connectors.faults import FaultPlan
from connectors.pd_heads import RankGeometry, route_rows, routes
from connectors.pd_rank import RankKV
from connectors.protocol import EngineMetadata
from connectors.transports.base import TransferOp, TransferStatus, merge_array
from disagg.models.parallel import kv_head_range


def rank_name(engine_id: str, rank: int) -> str:
    """A peer rank's name to this engine's transports (rank 0 keeps the engine id)."""
    return engine_id if rank == 0 else f"{engine_id}#r{rank}"


@dataclass(slots=True)
class _Op:
    """One transfer op: its parts still pending, as (local rank, that rank's op id)."""

    parts: list[tuple[int, int]]
    error: str | None = None
    reported: bool = False
    """FAILED was answered once; later polls say PENDING while parts still run."""
    ended: list[tuple[int, int]] = field(default_factory=list)
    """Parts done or failed (released with the op)."""


@dataclass(frozen=True, slots=True)
class _Peer:
    epoch: int
    tp_size: int
    geometry: RankGeometry
    descriptors: tuple[bytes, ...]


class PDWorkerSide:
    """Posts one-sided block copies over every TP rank of this engine and polls them."""

    def __init__(self, ranks: list[Any], num_kv_heads: int, geometry: RankGeometry,
                 faults: FaultPlan | None = None) -> None:
        self.ranks = ranks
        """Rank 0: a RankKV in this process; ranks 1..: RemoteRank handles (pd_rank.py)."""
        self.local: RankKV = ranks[0]
        self.tp_size = len(ranks)
        self.num_kv_heads = num_kv_heads
        self.geometry = geometry
        self.transport = self.local.transport
        self.kv_cache = self.local.kv_cache
        self.block_bytes = self.local.block_bytes
        self.layer_bytes = self.local.layer_bytes
        self.peers: dict[str, _Peer] = {}
        self._ops: dict[int, _Op] = {}
        self._ids = itertools.count(1)
        self._faults = faults

    # ---- peers ---------------------------------------------------------------------------
    def descriptor(self) -> bytes:
        """Rank 0's transport descriptor (sent in handshakes)."""
        return self.local.descriptor()

    def descriptors(self) -> list[bytes]:
        """Every rank's transport descriptor, in rank order."""
        return [r.descriptor() for r in self.ranks]

    def add_peer(self, meta: EngineMetadata) -> None:
        """Connect each local rank to the peer ranks it exchanges heads with; again when the
        peer restarted (another epoch: maybe another TP size, other endpoints)."""
        old = self.peers.get(meta.engine_id)
        descriptors = tuple(meta.rank_descriptors or [meta.transport_descriptor])
        if old is not None and (old.epoch, old.tp_size, old.descriptors) == (
                meta.epoch, meta.tp_size, descriptors):
            return
        peer_heads = kv_head_range(self.num_kv_heads, meta.tp_size, 0)[1]
        g = self.geometry
        peer = _Peer(meta.epoch, meta.tp_size,
                     RankGeometry(g.num_layers, g.block_size, peer_heads, g.head_bytes),
                     descriptors)
        for local, remote in self._pairs(peer):
            self.ranks[local].add_peer(rank_name(meta.engine_id, remote), descriptors[remote])
        self.peers[meta.engine_id] = peer

    def streams_layers_to(self, peer: str) -> bool:
        """Layerwise WRITE needs one rank on both sides (rank 0's forward posts each layer)."""
        p = self.peers.get(peer)
        return self.tp_size == 1 and p is not None and p.tp_size == 1

    def _pairs(self, peer: _Peer) -> set[tuple[int, int]]:
        """(local rank, peer rank) pairs with at least one route, either direction."""
        as_producer = routes(self.num_kv_heads, self.tp_size, peer.tp_size)
        as_consumer = routes(self.num_kv_heads, peer.tp_size, self.tp_size)
        return {(r.producer_rank, r.consumer_rank) for r in as_producer} | \
            {(r.consumer_rank, r.producer_rank) for r in as_consumer}

    def _routes(self, op: TransferOp, peer: _Peer) -> list[tuple[int, int, int, int, int]]:
        """(local rank, peer rank, local head, peer head, heads) of a transfer this engine
        posts: READ pulls into the local (consumer) ranks, WRITE pushes from them."""
        if op is TransferOp.READ:
            return [(r.consumer_rank, r.producer_rank, r.consumer_head, r.producer_head,
                     r.num_heads) for r in routes(self.num_kv_heads, peer.tp_size, self.tp_size)]
        return [(r.producer_rank, r.consumer_rank, r.producer_head, r.consumer_head,
                 r.num_heads) for r in routes(self.num_kv_heads, self.tp_size, peer.tp_size)]

    # ---- posting -------------------------------------------------------------------------
    def post(self, op: TransferOp, peer: str, local_blocks: list[int],
             remote_blocks: list[int]) -> tuple[int, int]:
        """Start the copy of whole blocks (every rank its heads) after the step's KV writes;
        returns (op id, bytes)."""
        p = self.peers[peer]
        plan = [(local, remote, route_rows(local_blocks, remote_blocks, self.geometry,
                                           p.geometry, lh, ph, n))
                for local, remote, lh, ph, n in self._routes(op, p)]
        nbytes = int(sum(int(rows[:, 2].sum()) for _, _, rows in plan))
        label = f"{op.value} of {sum(len(rows) for _, _, rows in plan)} runs to {peer}"
        injected = self._injected(label)
        if injected is not None:
            return self._new([(0, injected)]), nbytes
        parts: list[tuple[int, int]] = []
        op_id = self._new(parts)
        for local, remote, rows in plan:
            parts.append((local, self.ranks[local].post_rows(op, rank_name(peer, remote), rows,
                                                             label)))
        return op_id, nbytes

    def post_layers(self, peer: str, first: int, count: int, local_blocks: list[int],
                    remote_blocks: list[int]) -> tuple[int, int]:
        """WRITE layers ``first .. first + count - 1`` of blocks whose K/V the current step just
        wrote (layerwise streaming: one rank on each side, see streams_layers_to); a block's
        layers are contiguous, so that is one run per block pair. Never blocks the host."""
        if not self.streams_layers_to(peer):
            raise ValueError(f"layerwise write to {peer}: both sides need one TP rank")
        rows = block_rows(local_blocks, remote_blocks, self.block_bytes,
                          first * self.layer_bytes, count * self.layer_bytes)
        span = f"layer {first}" if count == 1 else f"layers {first}-{first + count - 1}"
        label = f"{span} write to {peer}"
        nbytes = int(rows[:, 2].sum())
        injected = self._injected(label)
        if injected is not None:
            return self._new([(0, injected)]), nbytes
        return self._new([(0, self.local.post_layer_rows(peer, rows, label))]), nbytes

    def _new(self, parts: list[tuple[int, int]]) -> int:
        op_id = next(self._ids)
        self._ops[op_id] = _Op(parts)
        return op_id

    def _injected(self, label: str) -> int | None:
        """An injected ``post`` fault's op instead of a real post (connectors/faults.py)."""
        for f in self._faults.fire("post") if self._faults is not None else ():
            return self.local.inject(label, "injected fault: post failed"
                                     if f.action == "fail" else None)
        return None

    # ---- polling -------------------------------------------------------------------------
    def poll(self, op_id: int) -> TransferStatus:
        """DONE once every part is done; FAILED as soon as one part failed (answered once:
        afterwards PENDING while other parts still run, so the blocks they touch stay parked
        until none can write any more, then FAILED again); else PENDING."""
        op = self._ops[op_id]
        pending: list[tuple[int, int]] = []
        for rank, part in op.parts:
            state = self.ranks[rank].poll(part)
            if state is TransferStatus.PENDING:
                pending.append((rank, part))
                continue
            op.ended.append((rank, part))
            if state is TransferStatus.FAILED and op.error is None:
                why = self.ranks[rank].error(part) or "a KV copy failed"
                op.error = f"tp rank {rank}: {why}" if self.tp_size > 1 else why
        op.parts = pending
        if op.error is not None:
            if not op.reported:
                op.reported = True
                return TransferStatus.FAILED
            return TransferStatus.PENDING if pending else TransferStatus.FAILED
        return TransferStatus.PENDING if pending else TransferStatus.DONE

    def error(self, op_id: int) -> str | None:
        """Why an op failed."""
        op = self._ops.get(op_id)
        return None if op is None else op.error

    def release(self, op_id: int) -> None:
        """Forget an op; its pending parts are cancelled on every rank."""
        op = self._ops.pop(op_id, None)
        if op is None:
            return
        for rank, part in [*op.parts, *op.ended]:
            self.ranks[rank].release(part)

    def drop_unposted(self, op_ids: list[int]) -> list[int]:
        """Cancel the parts still waiting for their KV; returns the ids of ops with parts that
        were posted and may still write (an op left with none is released)."""
        keep = []
        for op_id in op_ids:
            op = self._ops.get(op_id)
            if op is None:
                continue
            left: list[tuple[int, int]] = []
            for rank in sorted({r for r, _ in op.parts}):
                ids = [p for r, p in op.parts if r == rank]
                left += [(rank, p) for p in self.ranks[rank].drop_unposted(ids)]
            op.parts = left
            if left:
                keep.append(op_id)
            else:
                self.release(op_id)
        return keep

    # ---- verify_kv and fault drills ------------------------------------------------------
    def digests(self, block_ids: list[int]) -> list[bytes]:
        """An 8-byte digest of each block's bytes in head order (the first rank holding a head
        gives it), equal for the same KV whatever the TP size (verify_kv; a GPU cache is copied
        to host)."""
        per_rank = [r.head_digests(block_ids) for r in self.ranks]
        out = []
        for i in range(len(block_ids)):
            heads: dict[int, bytes] = {}
            for rank, digests in enumerate(per_rank):
                start = kv_head_range(self.num_kv_heads, self.tp_size, rank)[0]
                for j, d in enumerate(digests[i]):
                    heads.setdefault(start + j, d)
            out.append(hashlib.blake2b(b"".join(heads[h] for h in sorted(heads)),
                                       digest_size=8).digest())
        return out

    def flip_byte(self, block_id: int) -> None:
        """Corrupt rank 0's part of a block (an injected ``landed`` fault)."""
        self.local.flip_byte(block_id)

    def close(self) -> None:
        """Close this process's endpoint (worker ranks close theirs when they stop)."""
        self.local.close()


def block_rows(local_blocks: list[int], remote_blocks: list[int], block_bytes: int,
               offset: int, length: int) -> np.ndarray:
    """(local, remote, length) rows of ``length`` bytes at ``offset`` inside each block pair,
    runs contiguous on both sides merged; built in numpy (256 blocks: ~10 us, against ~100 us
    for a list of Segments merged in Python)."""
    n = min(len(local_blocks), len(remote_blocks))
    top = max([*local_blocks[:n], *remote_blocks[:n], 0])
    if min([*local_blocks[:n], *remote_blocks[:n], 0]) < 0 or \
            (top + 1) * block_bytes >= 2**62:  # int64 rows must not wrap (checked at the edge)
        raise ValueError(f"block id {top} is out of range for {block_bytes}-byte blocks")
    rows = np.empty((n, 3), dtype=np.int64)
    rows[:, 0], rows[:, 1] = local_blocks[:n], remote_blocks[:n]
    rows[:, :2] *= block_bytes
    rows[:, :2] += offset
    rows[:, 2] = length
    return merge_array(rows)


__all__ = ["PDWorkerSide", "block_rows", "rank_name"]
