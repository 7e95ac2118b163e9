"""The P/D connector's view of its peers: who they are (identified by handshake), cached
handshakes, notifications sent to them, the leases it keeps on their transfers, and
notifications that arrived before their transfer.

A handshake is started once per peer address and shared by every transfer with that peer; a
failed one is retried on the next transfer. A peer is the pair (engine id, epoch): one that
restarted on the same ports is another peer, and the KV its predecessor held is gone, so a
transfer that expected the old one fails (after one fresh handshake to rule out a stale cache)
instead of retrying forever.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from connectors.control_plane import ControlPlane
from connectors.pd_worker import PDWorkerSide
from connectors.protocol import EngineMetadata, Notification, RemoteBlocks
from connectors.transfer import Timeouts, Transfer

Address = tuple[str, int]
MAX_KNOWN_PEERS = 4096
MAX_EPOCHS_PER_ENGINE = 8
MAX_TOMBSTONES = 65536
MAX_EARLY = 4096
"""remote_blocks kept for transfers this engine does not know yet (each expires after
defer_timeout). Their senders are not identified yet (the prefill handshakes the decode only
once its request names the transfer): anyone can send them, so they are bounded by count and,
all together, by MAX_EARLY_BLOCK_IDS."""
MAX_EARLY_BLOCK_IDS = 1 << 20
"""Transfers remembered as given up by their peer (each for defer_timeout); past this the
oldest is forgotten first. Forgetting one is safe: its remote_blocks were dropped when it was
buried (a peer sends them before it gives up, on the same socket), so a late request for it
finds no destination and expires."""


@dataclass(slots=True)
class _Hello:
    future: concurrent.futures.Future[EngineMetadata]
    started_s: float


def _evict(table: OrderedDict[Any, Any], limit: int, keep: Callable[[Any], bool]) -> None:
    """Forget the least recently used entries of ``table`` down to ``limit``, never one
    ``keep`` names (the table may stay over its limit by those: they are bounded by the live
    transfers)."""
    excess = len(table) - limit
    if excess > 0:  # stops at the first ``excess`` victims: a flood evicts one per handshake
        for key in list(itertools.islice((k for k in table if not keep(k)), excess)):
            del table[key]


class PeerLinks:
    """Identified peers, handshakes, sends, leases, early notifications and tombstones."""

    def __init__(self, control: ControlPlane, worker: PDWorkerSide, timeouts: Timeouts,
                 counters: dict[str, float],
                 transfers: Mapping[str, Transfer] | None = None) -> None:
        self.control = control
        self._transfers: Mapping[str, Transfer] = {} if transfers is None else transfers
        """The connector's live transfers: a peer one of them names is never forgotten to
        make room (anyone can handshake; a flood of strangers must not unseat it)."""
        self.worker = worker
        self.timeouts = timeouts
        self.counters = counters
        self._hellos: dict[Address, _Hello] = {}
        self.known: OrderedDict[str, OrderedDict[int, EngineMetadata]] = OrderedDict()
        """Peers identified by a handshake (ours to them or theirs to us): engine id -> epoch
        -> metadata. A peer is the pair, so a handshake naming a known engine id with another
        epoch (a restart, or a stranger claiming that id) adds one and unseats none: the
        engine that did handshake stays identified."""
        self.early: dict[str, tuple[RemoteBlocks, float]] = {}
        """WRITE: remote_blocks from a decode that raced ahead of the prefill's request (only
        ``stash_early`` adds, ``take_early`` removes)."""
        self._early_ids = 0  # block ids in ``early``
        self.heard_s: dict[tuple[str, int], float] = {}
        """When each identified peer (engine id, epoch) last sent this engine anything: a
        message, or a handshake of its own (pd_exposure.py judges silence by it; bounded with
        ``known``)."""
        self.tombstones: dict[str, tuple[str, float]] = {}
        """Transfers the peer failed before this side knew them: a late request for one must
        not use stale remote_blocks (the decode already freed those blocks)."""

    # ---- identity ------------------------------------------------------------------------
    def learn(self, meta: EngineMetadata) -> None:
        """Remember an identified peer (bounded: the least recently used is forgotten first,
        by engine id and by epoch within one)."""
        epochs = self.known.setdefault(meta.engine_id, OrderedDict())
        epochs[meta.epoch] = meta
        epochs.move_to_end(meta.epoch)
        self.known.move_to_end(meta.engine_id)
        if len(epochs) <= MAX_EPOCHS_PER_ENGINE and len(self.known) <= MAX_KNOWN_PEERS:
            return
        in_use = {(t.peer_engine_id, t.peer_epoch) for t in self._transfers.values()
                  if t.peer_engine_id is not None}
        engines_in_use = {engine for engine, _ in in_use}
        _evict(epochs, MAX_EPOCHS_PER_ENGINE,
               lambda epoch: (meta.engine_id, epoch) in in_use or epoch == meta.epoch)
        _evict(self.known, MAX_KNOWN_PEERS,
               lambda engine: engine in engines_in_use or engine == meta.engine_id)
        for peer in [p for p in self.heard_s if p[1] not in self.known.get(p[0], {})]:
            del self.heard_s[peer]

    def identify(self, engine_id: str, epoch: int) -> EngineMetadata | None:
        """The handshaken peer that sent a message with this identity, else None (a peer that
        keeps talking stays the most recently used, and is heard now)."""
        epochs = self.known.get(engine_id)
        meta = None if epochs is None else epochs.get(epoch)
        if meta is not None and epochs is not None:
            epochs.move_to_end(epoch)
            self.known.move_to_end(engine_id)
            self.heard_s[(engine_id, epoch)] = time.monotonic()
        return meta

    def hello_from(self, meta: EngineMetadata) -> None:
        """A peer handshook this engine: identified, and heard now."""
        self.learn(meta)
        if meta.epoch in self.known.get(meta.engine_id, {}):
            self.heard_s[(meta.engine_id, meta.epoch)] = time.monotonic()

    def last_heard(self, engine_id: str, epoch: int | None) -> float | None:
        """When that peer last spoke (``epoch`` None: any epoch of the engine, for a transfer
        not bound to one yet), None if never."""
        if epoch is not None:
            return self.heard_s.get((engine_id, epoch))
        times = [s for (e, _), s in self.heard_s.items() if e == engine_id]
        return max(times) if times else None

    def known_address(self, engine_id: str, epoch: int) -> Address | None:
        """Where an identified peer listens for notifications (None: not identified; its
        place in the table is left as it is)."""
        epochs = self.known.get(engine_id)
        meta = None if epochs is None else epochs.get(epoch)
        return None if meta is None else (meta.host, meta.notify_port)

    # ---- handshakes ----------------------------------------------------------------------
    @staticmethod
    def _address(t: Transfer) -> Address | None:
        if t.peer_host is None or t.peer_handshake_port is None:
            return None
        return t.peer_host, int(t.peer_handshake_port)

    def start_hello(self, t: Transfer, *, fresh: bool = False) -> None:
        """Start the handshake with t's peer unless one is running or has succeeded."""
        addr = self._address(t)
        if addr is None:
            return
        hello = self._hellos.get(addr)
        if fresh or hello is None or (hello.future.done() and
                                      hello.future.exception() is not None):
            timeout = min(self.timeouts.transfer_timeout_s, 10.0)
            self._hellos[addr] = _Hello(self.control.handshake(*addr, timeout),
                                        time.monotonic())

    def resolve(self, t: Transfer, *, connect: bool = True) -> tuple[str | None, str | None]:
        """``(peer engine id, None)`` once its handshake succeeded (its transport descriptor
        is then added, unless ``connect`` is False: a side that posts no op only needs to
        know the peer), ``(None, why)`` if it was refused or is not the peer t expects,
        ``(None, None)`` while pending."""
        addr = self._address(t)
        hello = None if addr is None else self._hellos.get(addr)
        if addr is not None and hello is None:  # forgotten (another transfer's failure):
            self.start_hello(t)  # handshake again rather than leave t pending for good
            return None, None
        if addr is None or hello is None or not hello.future.done():
            return None, None
        exc = hello.future.exception()
        if exc is not None:
            return None, str(exc)
        meta = hello.future.result()
        expected = (meta.engine_id if t.peer_engine_id is None else t.peer_engine_id,
                    meta.epoch if t.peer_epoch is None else t.peer_epoch)
        if (meta.engine_id, meta.epoch) != expected:
            if hello.started_s < t.created_s:  # a cached answer may predate a restart
                self.start_hello(t, fresh=True)
                return None, None
            return None, (f"the KV peer at {addr[0]}:{addr[1]} is now engine {meta.engine_id} "
                          f"(epoch {meta.epoch}), not the {t.peer_engine_id} that this "
                          "transfer's KV belongs to: it restarted, its KV is gone")
        self.learn(meta)
        # it answered after we asked: heard then at the latest (pd_exposure.py)
        peer = (meta.engine_id, meta.epoch)
        self.heard_s[peer] = max(self.heard_s.get(peer, 0.0), hello.started_s)
        t.peer_engine_id, t.peer_epoch, t.peer_num_blocks = (meta.engine_id, meta.epoch,
                                                              meta.num_blocks)
        # notify where the identified peer says it listens: the params' copy of its notify
        # port is the proxy's word, and a wrong one would strand the transfer until expiry
        t.peer_notify_port = meta.notify_port
        if not connect:
            return meta.engine_id, None
        try:
            self.worker.add_peer(meta)
        except Exception as exc:  # a descriptor our transport (or a TP rank's) cannot use
            return None, (f"cannot connect to peer {meta.engine_id}'s KV transport: "
                          f"{type(exc).__name__}: {exc}")
        return meta.engine_id, None

    def hello_error(self, t: Transfer) -> str | None:
        """Why the handshake with t's peer failed, once it has (None: pending or fine)."""
        addr = self._address(t)
        hello = None if addr is None else self._hellos.get(addr)
        if hello is None or not hello.future.done() or hello.future.exception() is None:
            return None
        return str(hello.future.exception())

    def forget_hello(self, t: Transfer) -> None:
        """Handshake afresh next time (a failed one-sided op may mean a restarted peer)."""
        addr = self._address(t)
        if addr is not None:
            self._hellos.pop(addr, None)

    def bury(self, transfer_id: str, reason: str, now: float) -> None:
        """The peer gave up on a transfer this side does not run (yet): drop its queued
        remote_blocks and refuse a request that names it later (bounded: MAX_TOMBSTONES)."""
        self.take_early(transfer_id)
        self.tombstones.pop(transfer_id, None)
        self.tombstones[transfer_id] = (reason, now)
        while len(self.tombstones) > MAX_TOMBSTONES:
            del self.tombstones[next(iter(self.tombstones))]

    # ---- early remote_blocks ----------------------------------------------------------------
    def stash_early(self, msg: RemoteBlocks, now: float) -> bool:
        """Keep remote_blocks for a transfer not known yet; False (dropped) past the bounds."""
        self.take_early(msg.transfer_id)
        if len(self.early) >= MAX_EARLY or \
                self._early_ids + len(msg.block_ids) > MAX_EARLY_BLOCK_IDS:
            return False
        self.early[msg.transfer_id] = (msg, now)
        self._early_ids += len(msg.block_ids)
        return True

    def take_early(self, transfer_id: str) -> RemoteBlocks | None:
        """Remove and return the remote_blocks kept for a transfer, if any."""
        entry = self.early.pop(transfer_id, None)
        if entry is None:
            return None
        self._early_ids -= len(entry[0].block_ids)
        return entry[0]

    # ---- sending -------------------------------------------------------------------------
    def send(self, t: Transfer, msg: Notification) -> None:
        """Notify t's peer (nothing when its notify address is unknown)."""
        addr = t.peer_notify
        if addr is not None:
            self.control.send((addr[0], int(addr[1])), msg)

    def reply(self, meta: EngineMetadata, msg: Notification) -> None:
        """Notify an identified peer at the address of its handshake."""
        self.control.send((meta.host, meta.notify_port), msg)

    def refresh_leases(self, transfers: Iterable[Transfer],
                       draining: Iterable[Transfer] = ()) -> None:
        """Hand the control thread the transfers to lease (it sends them on its own timer):
        the live ones whose next move is ours and failed WRITE ones whose writes to the decode's
        blocks still drain (it waits for our quiesced); and, as ``received``, the decode blocks
        held for no transfer (they came before their request), when their sender is
        identified: the decode must hear from a prefill holding its blocks (pd_exposure.py)."""
        by_peer: dict[Address, list[str]] = {}
        for t in transfers:
            addr = t.peer_notify
            if addr is not None and not t.terminal and t.owes_peer:
                by_peer.setdefault((addr[0], int(addr[1])), []).append(t.transfer_id)
        for t in draining:
            if (addr := t.peer_notify) is not None:
                by_peer.setdefault((addr[0], int(addr[1])), []).append(t.transfer_id)
        received: dict[Address, list[str]] = {}
        for tid, (msg, _) in self.early.items():
            if (known := self.known_address(msg.engine_id, msg.epoch)) is not None:
                received.setdefault(known, []).append(tid)
        self.control.set_leases(by_peer, received)

    def expire(self, now: float) -> None:
        """Drop tombstones and early notifications older than ``defer_timeout``."""
        limit = self.timeouts.defer_timeout_s
        for tid in [k for k, (_, t0) in self.tombstones.items() if now - t0 > limit]:
            del self.tombstones[tid]
        for tid in [k for k, (_, t0) in self.early.items() if now - t0 > limit]:
            self.take_early(tid)
            self.counters["notifications_unknown_total"] += 1
