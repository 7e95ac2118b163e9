"""The one interface every KV transport implements.

A transport moves byte ranges between registered memory regions of two engines with one-sided
operations: the side that posts a READ pulls from the peer's region, a WRITE pushes into it,
and the peer's engine code does nothing per transfer (the tcp transport's server thread is the
transport's own machinery, not engine code).

Life cycle::

    t = make_transport("tcp", agent_name="engine-P0", host="127.0.0.1")
    t.register_region(kv_cache)                 # the engine's one KV tensor (CPU or GPU)
    desc = t.descriptor()                       # bytes; sent to the peer in the handshake
    t.add_peer("engine-D0", peer_desc)          # from the peer's handshake
    h = t.post(TransferOp.READ, "engine-D0", [(local_off, remote_off, nbytes), ...])
    while t.poll(h) is TransferStatus.PENDING: ...   # caller owns the deadline
    t.release(h)

Offsets are byte offsets inside the single registered region of each side. Every call is
thread-safe; ``poll`` never blocks for long.
"""

from __future__ import annotations

import abc
import enum
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch


class TransferOp(enum.Enum):
    """Direction of a one-sided operation, seen from the side that posts it."""

    READ = "read"
    WRITE = "write"


class TransferStatus(enum.Enum):
    """State of a posted batch."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class Segment(NamedTuple):
    """One contiguous copy: ``length`` bytes between local and remote byte offsets."""

    local_offset: int
    remote_offset: int
    length: int


Batch = Sequence[Segment] | np.ndarray
"""What ``Transport.post`` takes: segments, or an [n, 3] int64 array of (local offset, remote
offset, length) rows (what the P/D worker builds: no Python object per block)."""


class TransportError(RuntimeError):
    """A transport could not be set up or a peer descriptor is unusable."""


class Transport(abc.ABC):
    """One-sided byte mover between registered regions of two engines."""

    name: str = "base"
    stream_ordered: bool = False
    """``post`` orders its copies of GPU memory after the caller's current CUDA stream, so
    work queued there (a layer's KV writes) needs no host-side wait before posting."""

    @abc.abstractmethod
    def register_region(self, tensor: torch.Tensor) -> None:
        """Register the engine's KV tensor (contiguous; CPU or GPU). Call once, before use."""

    @abc.abstractmethod
    def descriptor(self) -> bytes:
        """Serializable description of this side (address, region handle, size)."""

    @abc.abstractmethod
    def add_peer(self, peer_name: str, descriptor: bytes) -> None:
        """Connect to a peer from its descriptor; idempotent for the same name."""

    @abc.abstractmethod
    def remove_peer(self, peer_name: str) -> None:
        """Forget a peer; its pending handles become FAILED."""

    @abc.abstractmethod
    def post(self, op: TransferOp, peer_name: str, segments: Batch) -> int:
        """Start a batch of one-sided copies; returns a handle. Never blocks on the network.

        The copies of one batch may run in any order and concurrently (NIXL, cuMemcpyBatchAsync
        and the copy kernel all do), so no two segments may write the same bytes; a KV batch
        never does (each block id appears once per request)."""

    @abc.abstractmethod
    def poll(self, handle: int) -> TransferStatus:
        """Current state of a posted batch."""

    @abc.abstractmethod
    def release(self, handle: int) -> None:
        """Forget a handle (cancelling it if still pending)."""

    def error(self, handle: int) -> str | None:
        """Why a FAILED handle failed, when known."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Stop threads, deregister memory, close connections. Idempotent."""


def as_segments(segments: Batch) -> Sequence[Segment]:
    """A batch as segments (rows of an array become Segments)."""
    if isinstance(segments, np.ndarray):
        return [Segment(*row) for row in segments.tolist()]
    return segments


def merge_segments(segments: Batch) -> list[Segment]:
    """Merge runs that are contiguous on both sides (sorted by local offset)."""
    merged: list[Segment] = []
    for seg in sorted(as_segments(segments), key=lambda s: s.local_offset):
        if merged:
            last = merged[-1]
            if (last.local_offset + last.length == seg.local_offset
                    and last.remote_offset + last.length == seg.remote_offset):
                merged[-1] = Segment(last.local_offset, last.remote_offset,
                                     last.length + seg.length)
                continue
        merged.append(seg)
    return merged


def merge_array(segments: Batch) -> np.ndarray:
    """``merge_segments`` as one [n, 3] int64 array of (local, remote, length) rows, computed
    without a Python loop (for transports that hand the batch to numpy-speaking APIs)."""
    if isinstance(segments, np.ndarray):
        arr = np.asarray(segments, dtype=np.int64).reshape(-1, 3)
    else:  # fromiter over the flattened tuples: ~5x faster than np.array on NamedTuples
        arr = np.fromiter(itertools.chain.from_iterable(segments), dtype=np.int64,
                          count=3 * len(segments)).reshape(-1, 3)
    if len(arr) < 2:
        return arr
    # Rows that are already merged (the P/D worker's are) come back as they are: no sort, no
    # copy; each numpy call skipped is host time before the first copy.
    if (arr[1:, 0] < arr[:-1, 0]).any():
        arr = arr[np.argsort(arr[:, 0], kind="stable")]
    joins = ((arr[:-1, 0] + arr[:-1, 2] == arr[1:, 0])
             & (arr[:-1, 1] + arr[:-1, 2] == arr[1:, 1]))
    if not joins.any():
        return arr
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    merged = arr[starts]
    merged[:, 2] = np.add.reduceat(arr[:, 2], starts)
    return merged


def strided_runs(runs: np.ndarray) -> np.ndarray:
    """Merged [n, 3] (local, remote, length) rows, sorted by local offset, as [g, 6] groups
    (local, remote, width, height, local pitch, remote pitch): consecutive rows of one length
    whose offsets step by the same amounts on both sides (the same layer of consecutive blocks,
    or a block's same heads) make one group, copied as one 2D copy; a row on its own is a group
    of height 1 (pitches 0). Every row is in exactly one group, in order. Only runs of 3 or
    more rows group (two rows stay two copies); where two runs of different steps share a row,
    the earlier run keeps it."""
    n = len(runs)
    out = np.zeros((n, 6), dtype=np.int64)
    if n == 0:
        return out
    width = runs[:, 2]
    ds, dd = np.diff(runs[:, 0]), np.diff(runs[:, 1])
    link = (width[1:] == width[:-1]) & (ds >= width[1:]) & (dd >= width[1:])
    # a step shared with a neighbouring step: part of a run of >= 3 evenly spaced rows
    same = link[1:] & link[:-1] & (ds[1:] == ds[:-1]) & (dd[1:] == dd[:-1])
    good = np.zeros_like(link)
    good[1:] |= same
    good[:-1] |= same
    join = good.copy()  # two runs of other steps meeting on one row: the later one yields it
    join[1:] &= ~(good[:-1] & ((ds[1:] != ds[:-1]) | (dd[1:] != dd[:-1])))
    starts = np.flatnonzero(np.concatenate(([True], ~join)))
    heights = np.diff(np.append(starts, n))
    out = out[:len(starts)]
    out[:, :3] = runs[starts]
    out[:, 3] = heights
    tall = heights > 1
    out[tall, 4] = ds[starts[tall]]
    out[tall, 5] = dd[starts[tall]]
    return out


def split_bounds(sizes: np.ndarray, max_parts: int, min_bytes: int = 1) -> list[int]:
    """Row bounds ``[0, b1, ..., n]`` cutting rows of ``sizes`` bytes into consecutive groups
    of about equal bytes: one group per ``min_bytes`` started, at most ``max_parts``, none
    empty, no row split (``[0]`` for no rows)."""
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if len(ends) else 0
    k = max(1, min(max_parts, -(-total // max(1, min_bytes)), len(sizes)))
    cuts = np.searchsorted(ends, total * np.arange(1, k) / k, side="left") + 1
    return sorted({0, len(sizes), *cuts.tolist()})


def split_runs(runs: np.ndarray, max_parts: int, min_bytes: int = 1) -> list[np.ndarray]:
    """Cut [n, 3] rows (``merge_array``'s, or any column order with bytes last) into the
    consecutive groups of ``split_bounds``."""
    bounds = split_bounds(runs[:, 2], max_parts, min_bytes)
    return [runs[a:b] for a, b in zip(bounds, bounds[1:])]
