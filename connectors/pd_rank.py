"""One tensor-parallel rank's KV endpoint: its transport, its registered KV tensor, its ops.

Every rank of an engine core has one: rank 0's lives in the engine-core process and is called
directly, the others live in their TP worker processes (disagg/engine/tp_worker.py) and are
reached through ``RemoteRank``, which has the same methods. connectors/pd_worker.py fans a
transfer out over them.

Memory layout of a rank's cache (blocks outermost, see hip_kernels/__init__.py):

    block b:  | layer 0: K [bs tokens x H heads x D] V [...] | layer 1: K V | ... |
    a head range [h, h + n) of token t of (layer l, K or V) is the run at
        b * block_bytes + ((l * 2 + kv) * bs + t) * H * D * es + h * D * es,  n * D * es long
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import numpy as np
import torch

from connectors.faults import FaultPlan
from connectors.pd_poster import Posts
from connectors.transports import make_transport
from connectors.transports.base import TransferOp, TransferStatus
from disagg.engine.tp import TPCallError

RPC_METHODS = frozenset({"add_peer", "post_rows", "poll", "error", "release", "drop_unposted",
                         "head_digests"})
"""What rank 0 may call on a worker rank's endpoint."""


class RankKV:
    """Posts one-sided copies of (parts of) this rank's KV blocks and polls them."""

    def __init__(self, transport_name: str, agent_name: str, host: str,
                 kv_cache: torch.Tensor, options: dict[str, object],
                 ready_timeout_s: float, faults: FaultPlan | None = None) -> None:
        self.transport = make_transport(transport_name, agent_name=agent_name, host=host,
                                        **options)
        self.kv_cache = kv_cache
        self.block_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self.layer_bytes = self.block_bytes // kv_cache.shape[1]
        self.transport.register_region(kv_cache)
        self.posts = Posts(self.transport, ready_timeout_s)
        self.peers: dict[str, bytes] = {}
        self.faults = faults

    def descriptor(self) -> bytes:
        """This rank's transport descriptor (sent in handshakes)."""
        return self.transport.descriptor()

    def add_peer(self, name: str, descriptor: bytes) -> None:
        """Connect the transport to a peer rank (again when its descriptor changed)."""
        if self.peers.get(name) != descriptor:
            self.transport.add_peer(name, descriptor)
            self.peers[name] = descriptor

    def post_rows(self, op: TransferOp, peer: str, rows: np.ndarray, label: str) -> int:
        """Start a copy of (local, remote, length) rows after the step's KV writes. A
        ``stream_ordered`` transport orders the copy after the current stream itself; for the
        others the host waits for the stream here."""
        if self.kv_cache.is_cuda and not self.transport.stream_ordered:
            torch.cuda.current_stream(self.kv_cache.device).synchronize()
        return self.posts.post(op, peer, rows, label)

    def post_layer_rows(self, peer: str, rows: np.ndarray, label: str) -> int:
        """WRITE rows the current step is still computing, without blocking the host: on a GPU
        the copy is ordered after the queued work by the transport itself (``stream_ordered``)
        or by the poster thread waiting on an event."""
        if not self.kv_cache.is_cuda or self.transport.stream_ordered:
            return self.posts.post(TransferOp.WRITE, peer, rows, label)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.kv_cache.device))
        return self.posts.post_after(event, peer, rows, label)

    def inject(self, label: str, error: str | None) -> int:
        """An op that already failed (or, None, stalls): an injected ``post`` fault."""
        return self.posts.inject(label, error)

    def poll(self, op_id: int) -> TransferStatus:
        """State of a posted copy."""
        return self.posts.poll(op_id)

    def error(self, op_id: int) -> str | None:
        """Why a copy failed."""
        return self.posts.error(op_id)

    def release(self, op_id: int) -> None:
        """Forget a copy (cancelling it if still pending)."""
        self.posts.release(op_id)

    def drop_unposted(self, op_ids: list[int]) -> list[int]:
        """Cancel the copies still waiting for their KV; returns the ids of the others."""
        return self.posts.drop_unposted(op_ids)

    def head_digests(self, block_ids: list[int]) -> list[list[bytes]]:
        """Per block, an 8-byte digest of each of this rank's KV heads (all layers, K and V):
        the same bytes whatever the TP size, so two instances of different TP compare."""
        out = []
        for b in block_ids:
            block = self.kv_cache[b].detach()  # [L, 2, bs, H, D]
            per_head = block.permute(3, 0, 1, 2, 4).contiguous().cpu()
            out.append([hashlib.blake2b(per_head[h].view(torch.uint8).numpy().tobytes(),
                                        digest_size=8).digest()
                        for h in range(per_head.shape[0])])
        return out

    def flip_byte(self, block_id: int) -> None:
        """Flip the first byte of a block (an injected ``landed`` fault: corruption in flight)."""
        view = self.kv_cache[block_id].view(-1).view(torch.uint8)
        view[0] ^= 0xFF

    def rpc(self, method: str, args: tuple[Any, ...]) -> Any:
        """A call from rank 0 (disagg/engine/tp_worker.py); only RPC_METHODS."""
        if method not in RPC_METHODS:
            raise ValueError(f"not a KV rank call: {method!r}")
        return getattr(self, method)(*args)

    def close(self) -> None:
        """Stop the poster thread, then close the transport."""
        self.posts.close()
        self.transport.close()


class RemoteRank:
    """Rank 0's handle on a worker rank's RankKV: the same calls, over the TP channel.

    Once the group is broken (a worker died: the instance is going down) release and drop are
    no-ops and polls fail, so failing the requests never waits on a dead rank. A call that the
    worker answers with an error (the group is fine) fails that op, never the engine: a post
    becomes an op that already failed (negative id), a poll of it FAILED."""

    def __init__(self, group: Any, rank: int, descriptor: bytes, block_bytes: int) -> None:
        self.group, self.rank = group, rank
        self._descriptor, self.block_bytes = descriptor, block_bytes
        self._failed: dict[int, str] = {}
        self._next_failed = -1

    def descriptor(self) -> bytes:
        return self._descriptor

    def _call(self, method: str, *args: Any) -> Any:
        return self.group.call(self.rank, "kv", method, args)

    def _fail_op(self, op_id: int, why: str) -> None:
        self._failed[op_id] = why

    def add_peer(self, name: str, descriptor: bytes) -> None:
        self._call("add_peer", name, descriptor)

    def post_rows(self, op: TransferOp, peer: str, rows: np.ndarray, label: str) -> int:
        try:
            return int(self._call("post_rows", op, peer, rows, label))
        except TPCallError as exc:
            op_id, self._next_failed = self._next_failed, self._next_failed - 1
            self._fail_op(op_id, f"{label}: {exc}")
            return op_id

    def poll(self, op_id: int) -> TransferStatus:
        if self.group.failure is not None or op_id in self._failed:
            return TransferStatus.FAILED
        try:
            return TransferStatus(self._call("poll", op_id))
        except TPCallError as exc:
            self._fail_op(op_id, str(exc))
            return TransferStatus.FAILED

    def error(self, op_id: int) -> str | None:
        if op_id in self._failed:
            return self._failed[op_id]
        if self.group.failure is not None:
            return str(self.group.failure)
        return self._call("error", op_id)  # type: ignore[no-any-return]

    def release(self, op_id: int) -> None:
        if self._failed.pop(op_id, None) is None and self.group.failure is None:
            with contextlib.suppress(TPCallError):
                self._call("release", op_id)

    def drop_unposted(self, op_ids: list[int]) -> list[int]:
        if self.group.failure is not None:
            return []
        live = [i for i in op_ids if i not in self._failed]
        for i in op_ids:
            self._failed.pop(i, None)
        try:
            return list(self._call("drop_unposted", live)) if live else []
        except TPCallError:
            return live  # unknown: treat them as posted (they stay parked until settled)

    def head_digests(self, block_ids: list[int]) -> list[list[bytes]]:
        return list(self._call("head_digests", block_ids))

    def close(self) -> None:
        """The worker closes its own endpoint when it stops."""
