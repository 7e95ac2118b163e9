"""The block pool: the ledger that says who owns every KV block, and the prefix cache.

Every block is in exactly one of three states:

    free       no owner, no content anyone may reuse
    cached     no owner, but its KV is the full block of a known token prefix (its hash): a new
               request with that prefix shares it instead of recomputing; evicted LRU (it
               becomes free, its hash is forgotten) only when a fresh block is needed
    owned      one or more owners: requests running or waiting on it (a cached prefix is shared
               by every request that has it), and/or held transfers (a producer keeps KV for a
               peer; a consumer parks blocks an op may still write)

free + cached + owned == total, always (``check``); ``snapshot().free`` counts free + cached,
since both can be handed out. Who frees: the scheduler frees a request's blocks when it
finishes or is preempted; a held transfer's blocks are freed by the connector's terminal state.
A block with an owner is never evicted, so a transfer's blocks stay put while it runs.

A block's hash is set once, by ``cache``, when its owner has computed its KV (a full block) and
only the owner's own writes went into it; it is dropped only on eviction. Hashes chain: block i
hashes (hash of block i-1, its tokens), seeded by the model's identity
(disagg/common/block_hash.py: the proxy computes the same chains to route by cached prefix).
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import NamedTuple

from disagg.common.block_hash import block_hashes, model_seed

__all__ = ["BlockPool", "LedgerError", "LedgerSnapshot", "Owner", "OwnerKind", "block_hashes",
           "model_seed"]


class OwnerKind(enum.Enum):
    """Kinds of block owners besides the free pool."""

    REQUEST = "request"
    TRANSFER = "transfer"


class Owner(NamedTuple):
    """Who holds a block: a request id or a transfer id."""

    kind: OwnerKind
    key: str


class LedgerError(RuntimeError):
    """A block was freed or moved by someone who does not own it (a bug, never user error)."""


class LedgerSnapshot(NamedTuple):
    """Counts for /metrics and tests."""

    total: int
    free: int
    """Blocks that can be handed out: free plus cached."""
    requests: int
    """Owned by requests only."""
    held: int
    """Owned by at least one held transfer."""
    cached: int = 0
    """Of ``free``: blocks whose KV a request with the same prefix can reuse."""


MAX_EVENTS = 65536
"""Stored/removed hash events kept for the next ``take_events`` (older ones are dropped and
counted: a consumer that fell behind rebuilds its view from a snapshot)."""


class BlockPool:
    """Fixed set of block ids, the owners of each owned block, and the prefix cache."""

    def __init__(self, num_blocks: int, enable_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()
        """Unowned blocks with a hash, least recently used first."""
        self._owners: dict[int, list[Owner]] = {}
        self._transfer_refs: dict[int, int] = {}
        self._held = 0
        """Blocks with at least one TRANSFER owner."""
        self._hash_of: dict[int, int] = {}
        self._block_of: dict[int, int] = {}
        self._events: list[tuple[bool, int]] = []
        self.events_dropped = 0
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (free, or cached and evictable)."""
        return len(self._free) + len(self._cached)

    # ---- ownership ----------------------------------------------------------------------
    def allocate(self, num: int, owner: Owner) -> list[int] | None:
        """Take ``num`` fresh blocks for ``owner`` (evicting cached ones, LRU first, once the
        free ones run out); None (and nothing taken) if too few are free."""
        if num > self.num_free:
            return None
        ids = []
        for _ in range(num):
            if self._free:
                ids.append(self._free.popleft())
            else:
                b, _ = self._cached.popitem(last=False)
                self._forget_hash(b)
                self.evictions += 1
                ids.append(b)
        for b in ids:
            self._owners[b] = []
            self._add_owner(b, owner)
        return ids

    def share(self, block_ids: Sequence[int], owner: Owner) -> None:
        """Add ``owner`` to cached blocks (``lookup``'s answer): an unowned one leaves the LRU."""
        for b in block_ids:
            if b not in self._hash_of:
                raise LedgerError(f"block {b} is shared by {owner} but holds no cached prefix")
        for b in block_ids:
            if b in self._cached:
                del self._cached[b]
                self._owners[b] = []
            self._add_owner(b, owner)

    def free(self, block_ids: Sequence[int], owner: Owner) -> None:
        """Drop ``owner`` from each block; a block left without owners becomes cached (it has
        a hash) or free."""
        self._check_owned(block_ids, owner, "freed")
        for b in block_ids:
            self._remove_owner(b, owner)
            if not self._owners[b]:
                del self._owners[b]
                if b in self._hash_of:
                    self._cached[b] = None  # most recently used
                else:
                    self._free.append(b)

    def transfer_ownership(self, block_ids: Sequence[int], src: Owner, dst: Owner) -> None:
        """Hand blocks from one owner to another (a finished request -> a held transfer); other
        owners of a shared block keep it."""
        self._check_owned(block_ids, src, "moved")
        for b in block_ids:
            self._remove_owner(b, src)
            self._add_owner(b, dst)

    def _check_owned(self, block_ids: Sequence[int], owner: Owner, what: str) -> None:
        need: dict[int, int] = {}
        for b in block_ids:
            need[b] = need.get(b, 0) + 1
        for b, n in need.items():
            if self._owners.get(b, []).count(owner) < n:
                raise LedgerError(f"block {b} {what} by {owner} but owned by "
                                  f"{self._owners.get(b)}")

    def _add_owner(self, b: int, owner: Owner) -> None:
        self._owners[b].append(owner)
        if owner.kind is OwnerKind.TRANSFER:
            refs = self._transfer_refs.get(b, 0)
            self._transfer_refs[b] = refs + 1
            self._held += refs == 0

    def _remove_owner(self, b: int, owner: Owner) -> None:
        self._owners[b].remove(owner)
        if owner.kind is OwnerKind.TRANSFER:
            refs = self._transfer_refs[b] - 1
            if refs:
                self._transfer_refs[b] = refs
            else:
                del self._transfer_refs[b]
                self._held -= 1

    # ---- the prefix cache ---------------------------------------------------------------
    def cache(self, block_id: int, block_hash: int, owner: Owner) -> bool:
        """Record that ``block_id``, owned by ``owner``, holds the full block ``block_hash``.
        False (nothing recorded) when caching is off, the block already has a hash, or another
        block already stands for that prefix."""
        if not self.enable_caching or block_id in self._hash_of or block_hash in self._block_of:
            return False
        if owner not in self._owners.get(block_id, []):
            raise LedgerError(f"block {block_id} cached by {owner} but owned by "
                              f"{self._owners.get(block_id)}")
        self._hash_of[block_id], self._block_of[block_hash] = block_hash, block_id
        self._event(True, block_hash)
        return True

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest prefix of ``hashes`` that is cached (owned or not)."""
        out: list[int] = []
        if not self.enable_caching:
            return out
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def _forget_hash(self, b: int) -> None:
        h = self._hash_of.pop(b)
        del self._block_of[h]
        self._event(False, h)

    def _event(self, stored: bool, block_hash: int) -> None:
        if len(self._events) >= MAX_EVENTS:
            self._events.pop(0)
            self.events_dropped += 1
        self._events.append((stored, block_hash))

    def take_events(self) -> list[tuple[bool, int]]:
        """(stored?, hash) of every block hash recorded or evicted since the last call."""
        out, self._events = self._events, []
        return out

    def cached_hashes(self) -> list[int]:
        """Every hash the cache holds now (a snapshot for a consumer that lost events)."""
        return list(self._block_of)

    # ---- the ledger ---------------------------------------------------------------------
    def snapshot(self) -> LedgerSnapshot:
        """Current counts."""
        free = len(self._free) + len(self._cached)
        return LedgerSnapshot(self.num_blocks, free, self.num_blocks - free - self._held,
                              self._held, len(self._cached))

    def check(self) -> None:
        """Raise LedgerError if the invariant does not hold."""
        if len(self._free) + len(self._cached) + len(self._owners) != self.num_blocks:
            raise LedgerError("free + cached + owned != total")
        free, cached = set(self._free), set(self._cached)
        if free & cached or (free | cached) & self._owners.keys():
            raise LedgerError("a block is in two states")
        if any(not owners for owners in self._owners.values()):
            raise LedgerError("an owned block has no owner")
        if not cached <= self._hash_of.keys() or free & self._hash_of.keys():
            raise LedgerError("a cached block lost its hash, or a free block kept one")
        if any(self._block_of.get(h) != b for b, h in self._hash_of.items()):
            raise LedgerError("the hash index disagrees with the blocks")
        held = sum(1 for owners in self._owners.values()
                   if any(o.kind is OwnerKind.TRANSFER for o in owners))
        if held != self._held:
            raise LedgerError("held count is off")
