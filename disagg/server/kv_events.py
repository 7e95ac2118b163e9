"""The instance's prefix cache as one view over its DP ranks, published to the proxy.

    engine core rank r --KVCacheEvents--> InstanceKVView.apply(r, ...)      (event loop)
        per-rank hash sets; held[h] = ranks holding h. A count going 0 -> 1 is a store of
        the instance, 1 -> 0 an eviction: those go to the pending buffer, in order
    registrar thread: KVPublisher.messages(now) -> view.take() -> KVEvents frames
        (seq 0, 1, ...; chunks of MAX_KV_EVENTS_PER_MESSAGE; a snapshot every
        snapshot_interval_s, first thing, and after an overflow or a lost send)

The view is owned by the EngineClient; ``apply`` and ``take`` run in different threads, so one
lock guards its state. Bounded: at most ``max_pending`` changes wait for the registrar; one
more drops them all and the next ``take`` is a snapshot (the view itself stays exact).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from disagg.common.protocol import KVCacheEvents
from disagg.common.registration import MAX_KV_EVENTS_PER_MESSAGE, KVEvents

MAX_PENDING_CHANGES = 65536
"""Changes kept for the next publish; past it the registrar sends a snapshot instead."""
KV_PUBLISH_INTERVAL_S = 0.1
"""How often the registrar sends what changed (nothing when nothing did)."""
KV_SNAPSHOT_INTERVAL_S = 10.0
"""How often it sends every hash held, so a proxy that lost messages recovers."""


@dataclass(frozen=True, slots=True)
class KVPublish:
    """What the view hands the registrar: changes in order, or a snapshot replacing them."""

    changes: list[tuple[bool, int]]
    snapshot: list[int] | None = None


class InstanceKVView:
    """Which block hashes any DP rank of this instance holds, and the unpublished changes."""

    def __init__(self, dp_size: int, max_pending: int = MAX_PENDING_CHANGES) -> None:
        self._lock = threading.Lock()
        self._ranks: list[set[int]] = [set() for _ in range(dp_size)]
        self._held: dict[int, int] = {}
        """hash -> number of ranks holding it (never 0: such a hash is deleted)."""
        self._pending: list[tuple[bool, int]] = []
        self._max_pending = max_pending
        self._overflowed = False

    def apply(self, rank: int, events: KVCacheEvents) -> None:
        """One engine-core message's events of ``rank`` (a rank snapshot replaces its set)."""
        with self._lock:
            if events.snapshot is not None:
                self._replace(rank, set(events.snapshot))
            for stored, block_hash in events.changes:
                if stored:
                    self._add(rank, block_hash)
                else:
                    self._remove(rank, block_hash)

    def take(self, snapshot: bool = False) -> KVPublish | None:
        """The changes since the last take (None: none), or a snapshot of every hash held
        when asked or after the pending buffer overflowed."""
        with self._lock:
            if snapshot or self._overflowed:
                self._pending, self._overflowed = [], False
                return KVPublish([], list(self._held))
            if not self._pending:
                return None
            out, self._pending = self._pending, []
            return KVPublish(out)

    def ranks_holding(self, block_hash: int) -> int:
        """How many ranks hold ``block_hash`` (0: none)."""
        with self._lock:
            return self._held.get(block_hash, 0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def _replace(self, rank: int, hashes: set[int]) -> None:
        old = self._ranks[rank]
        for block_hash in old - hashes:
            self._remove(rank, block_hash)
        for block_hash in hashes - old:
            self._add(rank, block_hash)

    def _add(self, rank: int, block_hash: int) -> None:
        if block_hash in self._ranks[rank]:
            return
        self._ranks[rank].add(block_hash)
        count = self._held.get(block_hash, 0) + 1
        self._held[block_hash] = count
        if count == 1:
            self._emit(True, block_hash)

    def _remove(self, rank: int, block_hash: int) -> None:
        if block_hash not in self._ranks[rank]:
            return
        self._ranks[rank].discard(block_hash)
        count = self._held[block_hash] - 1
        if count:
            self._held[block_hash] = count
            return
        del self._held[block_hash]
        self._emit(False, block_hash)

    def _emit(self, stored: bool, block_hash: int) -> None:
        if self._overflowed:
            return
        if len(self._pending) >= self._max_pending:
            self._pending, self._overflowed = [], True
            return
        self._pending.append((stored, block_hash))


class KVPublisher:
    """Registrar side: the view's changes as numbered ``KVEvents`` frames. Owned by the
    registrar thread."""

    def __init__(self, view: InstanceKVView, http_url: str, engine_id: str,
                 interval_s: float = KV_PUBLISH_INTERVAL_S,
                 snapshot_interval_s: float = KV_SNAPSHOT_INTERVAL_S) -> None:
        self._view = view
        self._http_url = http_url
        self._engine_id = engine_id
        self.interval_s = interval_s
        """How often the registrar asks for messages."""
        self._snapshot_interval_s = snapshot_interval_s
        self._next_snapshot_s: float | None = None
        """Monotonic time of the next snapshot; None: the next call sends one."""
        self.seq = 0
        """The next message's sequence number."""

    def messages(self, now_s: float) -> list[KVEvents]:
        """What to send now, in order (empty: nothing changed)."""
        due = self._next_snapshot_s is None or now_s >= self._next_snapshot_s
        pub = self._view.take(snapshot=due)
        if pub is None:
            return []
        if pub.snapshot is not None:
            self._next_snapshot_s = now_s + self._snapshot_interval_s
            return [self._message(snapshot=pub.snapshot[:MAX_KV_EVENTS_PER_MESSAGE]),
                    *self._chunks((True, h) for h in pub.snapshot[MAX_KV_EVENTS_PER_MESSAGE:])]
        return self._chunks(pub.changes)

    def lost(self) -> None:
        """A message could not be sent: the proxy's view is behind, send a snapshot next."""
        self._next_snapshot_s = None

    def _chunks(self, changes: Iterable[tuple[bool, int]]) -> list[KVEvents]:
        out: list[KVEvents] = []
        batch: list[tuple[bool, int]] = []
        for change in changes:
            batch.append(change)
            if len(batch) == MAX_KV_EVENTS_PER_MESSAGE:
                out.append(self._message(changes=batch))
                batch = []
        if batch:
            out.append(self._message(changes=batch))
        return out

    def _message(self, changes: list[tuple[bool, int]] | None = None,
                 snapshot: list[int] | None = None) -> KVEvents:
        msg = KVEvents(http_url=self._http_url, engine_id=self._engine_id, seq=self.seq,
                       changes=changes or [], snapshot=snapshot)
        self.seq += 1
        return msg
