"""The P/D connector's view of its peers: cached handshakes, notifications sent to them, the
leases it keeps on their transfers, and notifications that arrived before their transfer.

A handshake is started once per peer address and shared by every transfer with that peer; a
failed one is retried on the next transfer, and one whose engine id no longer matches (the
peer restarted on the same ports) is replaced.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable

from connectors.control_plane import ControlPlane
from connectors.pd_worker import PDWorkerSide
from connectors.protocol import EngineMetadata, Notification, RemoteBlocks
from connectors.transfer import Timeouts, Transfer

Address = tuple[str, int]


class PeerLinks:
    """Handshakes, sends, leases, early notifications and tombstones of one connector."""

    def __init__(self, control: ControlPlane, worker: PDWorkerSide, timeouts: Timeouts,
                 counters: dict[str, float]) -> None:
        self.control = control
        self.worker = worker
        self.timeouts = timeouts
        self.counters = counters
        self._hellos: dict[Address, concurrent.futures.Future[EngineMetadata]] = {}
        self.early: dict[str, tuple[RemoteBlocks, float]] = {}
        """WRITE: remote_blocks from a decode that raced ahead of the prefill's request."""
        self.tombstones: dict[str, tuple[str, float]] = {}
        """Transfers the peer failed before this side knew them: a late request for one must
        not use stale remote_blocks (the decode already freed those blocks)."""

    @staticmethod
    def _address(t: Transfer) -> Address | None:
        if t.peer_host is None or t.peer_handshake_port is None:
            return None
        return t.peer_host, int(t.peer_handshake_port)

    def start_hello(self, t: Transfer) -> None:
        """Start the handshake with t's peer unless one is running or has succeeded."""
        addr = self._address(t)
        if addr is None:
            return
        fut = self._hellos.get(addr)
        if fut is None or (fut.done() and fut.exception() is not None):
            timeout = min(self.timeouts.transfer_timeout_s, 10.0)
            self._hellos[addr] = self.control.handshake(*addr, timeout)

    def resolve(self, t: Transfer) -> tuple[str | None, str | None]:
        """``(peer engine id, None)`` once its handshake succeeded (its transport descriptor
        is then added), ``(None, why)`` if it was refused, ``(None, None)`` while pending."""
        addr = self._address(t)
        fut = None if addr is None else self._hellos.get(addr)
        if addr is None or fut is None or not fut.done():
            return None, None
        exc = fut.exception()
        if exc is not None:
            return None, str(exc)
        meta = fut.result()
        if t.peer_engine_id is not None and meta.engine_id != t.peer_engine_id:
            # The peer restarted on the same ports: its cached metadata is stale.
            del self._hellos[addr]
            self.start_hello(t)
            return None, None
        self.worker.add_peer(meta.engine_id, meta.transport_descriptor)
        return meta.engine_id, None

    def forget_hello(self, t: Transfer) -> None:
        """Handshake afresh next time (a failed one-sided op may mean a restarted peer)."""
        addr = self._address(t)
        if addr is not None:
            self._hellos.pop(addr, None)

    def send(self, t: Transfer, msg: Notification) -> None:
        """Notify t's peer (nothing when its notify address is unknown)."""
        addr = t.peer_notify
        if addr is not None:
            self.control.send((addr[0], int(addr[1])), msg)

    def refresh_leases(self, transfers: Iterable[Transfer]) -> None:
        """Hand the control thread the transfers to lease (it sends them on its own timer)."""
        by_peer: dict[Address, list[str]] = {}
        for t in transfers:
            addr = t.peer_notify
            if addr is not None and not t.terminal:
                by_peer.setdefault((addr[0], int(addr[1])), []).append(t.transfer_id)
        self.control.set_leases(by_peer)

    def expire(self, now: float) -> None:
        """Drop tombstones and early notifications older than ``defer_timeout``."""
        limit = self.timeouts.defer_timeout_s
        for tid in [k for k, (_, t0) in self.tombstones.items() if now - t0 > limit]:
            del self.tombstones[tid]
        for tid in [k for k, (_, t0) in self.early.items() if now - t0 > limit]:
            del self.early[tid]
            self.counters["notifications_unknown_total"] += 1
