"""An in-memory transport for connector unit tests: records batches, settles them on demand."""

from __future__ import annotations

import itertools

import torch

from connectors.transports.base import (
    Batch,
    Segment,
    TransferOp,
    TransferStatus,
    Transport,
    as_segments,
)


class FakeTransport(Transport):
    """Records every batch; each handle's status is whatever the test sets (PENDING first)."""

    name = "fake"

    def __init__(self) -> None:
        self.posts: list[tuple[TransferOp, str, list[Segment]]] = []
        self.status: dict[int, TransferStatus] = {}
        self.released: list[int] = []
        self._ids = itertools.count(1)

    def register_region(self, tensor: torch.Tensor) -> None:
        """Nothing to register."""

    def descriptor(self) -> bytes:
        return b"fake"

    def add_peer(self, peer_name: str, descriptor: bytes) -> None:
        """Any peer is fine."""

    def remove_peer(self, peer_name: str) -> None:
        """Nothing to forget."""

    def post(self, op: TransferOp, peer_name: str, segments: Batch) -> int:
        self.posts.append((op, peer_name, list(as_segments(segments))))
        handle = next(self._ids)
        self.status[handle] = TransferStatus.PENDING
        return handle

    def poll(self, handle: int) -> TransferStatus:
        return self.status[handle]

    def error(self, handle: int) -> str | None:
        return "link down" if self.status[handle] is TransferStatus.FAILED else None

    def release(self, handle: int) -> None:
        self.released.append(handle)

    def close(self) -> None:
        """Nothing to close."""

    def settle_all(self, status: TransferStatus) -> None:
        """Move every pending batch to ``status``."""
        for h, s in self.status.items():
            if s is TransferStatus.PENDING:
                self.status[h] = status
