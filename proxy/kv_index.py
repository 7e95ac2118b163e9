"""Which block hashes each instance's prefix cache holds, as its ``KVEvents`` say.

    KVEvents(seq) --apply(url, msg)--> the instance's view
        seq == last + 1      -> its changes applied, in order
        a gap, or a first message without a snapshot
                             -> stale: hashes dropped, messages ignored until a snapshot
        another engine id    -> a restarted instance: a new view (stale unless a snapshot)
        snapshot             -> the view replaced, fresh
    bounded: ``max_hashes`` over all views; past it the view updated longest ago is dropped
        and stale (it comes back with its instance's next snapshot)
    forget(url): the instance left the registry

Each view also remembers the chains the proxy itself routed there in the last
``PREDICTED_TTL_S`` (llm-d's approximate prefix scorer): a prompt repeated before its
instance's next publish still finds its prefix. A store or an eviction of the hash from the
instance replaces the guess. Owned by the proxy's event loop (no locks).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from disagg.common.registration import KVEvents

logger = logging.getLogger(__name__)

DEFAULT_MAX_HASHES = 1 << 20
"""Hashes held over all views (~100 MB of Python ints and sets at most)."""
PREDICTED_TTL_S = 2.0
"""How long a routed request's hashes count as cached before the instance confirms them
(its events come every 0.1 s; this covers a slow publish)."""
MAX_PREDICTED = 4096
"""Predicted hashes kept per instance (the oldest go first)."""


@dataclass(slots=True, eq=False)
class InstanceView:
    """One instance's prefix cache as far as the proxy knows."""

    engine_id: str
    next_seq: int = 0
    hashes: set[int] | None = None
    """None: stale (lost messages, or none seen yet) until the next snapshot."""
    predicted: dict[int, float] = field(default_factory=dict)
    """hash -> monotonic expiry, oldest first."""


class KVIndex:
    """Per-instance views, keyed by the registry's instance URL."""

    def __init__(self, max_hashes: int = DEFAULT_MAX_HASHES) -> None:
        self._max_hashes = max_hashes
        self._views: OrderedDict[str, InstanceView] = OrderedDict()
        """Least recently updated first."""
        self.num_hashes = 0
        """Hashes held over all views."""
        self.stale_total: Counter[str] = Counter()
        """Views made stale, by reason: gap (lost messages), overflow (the bound)."""

    def apply(self, url: str, msg: KVEvents) -> None:
        """One message of the instance at ``url`` (already parsed and bounded)."""
        view = self._views.get(url)
        if view is None or view.engine_id != msg.engine_id:
            self.forget(url)
            view = self._views[url] = InstanceView(msg.engine_id, next_seq=msg.seq)
        gap = msg.seq != view.next_seq
        view.next_seq = msg.seq + 1
        self._views.move_to_end(url)
        if msg.snapshot is not None:
            self._set_hashes(view, set(msg.snapshot))
        elif view.hashes is None:
            return  # stale: only a snapshot helps
        elif gap:
            logger.info("KV view of %s is stale (seq gap) until its next snapshot", url)
            self._make_stale(view, "gap")
            return
        hashes = view.hashes
        assert hashes is not None
        before = len(hashes)
        for stored, block_hash in msg.changes:
            if stored:
                hashes.add(block_hash)
            else:
                hashes.discard(block_hash)
            view.predicted.pop(block_hash, None)  # the instance's word replaces the guess
        self.num_hashes += len(hashes) - before
        self._enforce_bound()

    def forget(self, url: str) -> None:
        """Drop the view of an instance that left."""
        view = self._views.pop(url, None)
        if view is not None and view.hashes is not None:
            self.num_hashes -= len(view.hashes)

    def fresh(self, url: str) -> bool:
        """Whether the instance's view is usable."""
        view = self._views.get(url)
        return view is not None and view.hashes is not None

    def num_fresh(self) -> int:
        """Instances with a usable view."""
        return sum(v.hashes is not None for v in self._views.values())

    def cached_blocks(self, url: str, chain: Sequence[int], now_s: float) -> int | None:
        """How many leading blocks of ``chain`` the instance holds (or was just sent); None
        when its view is not fresh."""
        view = self._views.get(url)
        if view is None or view.hashes is None:
            return None
        hashes, predicted = view.hashes, view.predicted
        n = 0
        for block_hash in chain:
            if block_hash not in hashes and predicted.get(block_hash, 0.0) <= now_s:
                break
            n += 1
        return n

    def note_routed(self, url: str, chain: Sequence[int], expires_s: float) -> None:
        """The proxy sent a prompt with this chain to ``url``: expect it cached until
        ``expires_s`` (or until the instance says otherwise)."""
        view = self._views.get(url)
        if view is None or view.hashes is None:
            return
        predicted = view.predicted
        for block_hash in chain:
            if block_hash not in view.hashes:
                predicted.pop(block_hash, None)  # re-inserted last: the newest
                predicted[block_hash] = expires_s
        while len(predicted) > MAX_PREDICTED:
            del predicted[next(iter(predicted))]

    def _set_hashes(self, view: InstanceView, hashes: set[int]) -> None:
        self.num_hashes += len(hashes) - (len(view.hashes) if view.hashes is not None else 0)
        view.hashes = hashes

    def _make_stale(self, view: InstanceView, reason: str) -> None:
        if view.hashes is not None:
            self.num_hashes -= len(view.hashes)
            self.stale_total[reason] += 1
        view.hashes = None
        view.predicted.clear()

    def _enforce_bound(self) -> None:
        """Drop the least recently updated views until the index fits again."""
        if self.num_hashes <= self._max_hashes:
            return
        for url, view in list(self._views.items()):
            if view.hashes is None:
                continue
            logger.warning("KV index over %d hashes: dropped the view of %s until its next "
                           "snapshot", self._max_hashes, url)
            self._make_stale(view, "overflow")
            if self.num_hashes <= self._max_hashes:
                return
