"""The block pool: the ledger that says who owns every KV block.

Invariant (checked by ``check``): every block is owned by exactly one of
  the free pool | a running/waiting request | a held transfer (producer keeps KV for a peer).
free + owned_by_requests + held == total, always; when idle, free == total.
Who frees: the scheduler frees a request's blocks when it finishes or is preempted; a held
transfer's blocks are freed by the connector's terminal state (done, failed or expired).
"""

from __future__ import annotations

import enum
from collections import deque
from typing import NamedTuple


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
    requests: int
    held: int


class BlockPool:
    """Fixed set of block ids with an exact owner for each allocated block."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, Owner] = {}
        self._held = 0

    @property
    def num_free(self) -> int:
        """Blocks in the free pool."""
        return len(self._free)

    def allocate(self, num: int, owner: Owner) -> list[int] | None:
        """Take ``num`` blocks for ``owner``; None (and nothing taken) if too few are free."""
        if num > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(num)]
        for b in ids:
            self._owner[b] = owner
        if owner.kind is OwnerKind.TRANSFER:
            self._held += num
        return ids

    def free(self, block_ids: list[int], owner: Owner) -> None:
        """Return blocks to the pool; each must belong to ``owner``."""
        for b in block_ids:
            if self._owner.get(b) != owner:
                raise LedgerError(f"block {b} freed by {owner} but owned by {self._owner.get(b)}")
        for b in block_ids:
            del self._owner[b]
            self._free.append(b)
        if owner.kind is OwnerKind.TRANSFER:
            self._held -= len(block_ids)

    def transfer_ownership(self, block_ids: list[int], src: Owner, dst: Owner) -> None:
        """Hand blocks from one owner to another (a finished request -> a held transfer)."""
        for b in block_ids:
            if self._owner.get(b) != src:
                raise LedgerError(f"block {b} moved by {src} but owned by {self._owner.get(b)}")
        for b in block_ids:
            self._owner[b] = dst
        delta = len(block_ids)
        self._held += (delta if dst.kind is OwnerKind.TRANSFER else 0) - (
            delta if src.kind is OwnerKind.TRANSFER else 0)

    def snapshot(self) -> LedgerSnapshot:
        """Current counts."""
        free = len(self._free)
        return LedgerSnapshot(self.num_blocks, free, self.num_blocks - free - self._held,
                              self._held)

    def check(self) -> None:
        """Raise LedgerError if the invariant does not hold."""
        if len(self._free) + len(self._owner) != self.num_blocks:
            raise LedgerError("free + owned != total")
        if set(self._free) & self._owner.keys():
            raise LedgerError("a block is both free and owned")
