"""The P/D worker's ops: every one-sided batch it posts, now or once a CUDA event completed.

An op is posted at once (CPU cache; a GPU cache when the caller synchronized or the transport
is ``stream_ordered``), or queued with a CUDA event recorded right after a layer's K/V writes:
the poster thread waits for the event (polling, with a deadline, never inside the forward) and
then posts. The connector sees only op ids: PENDING until posted, then the transport's state.

    engine thread:  layer l K/V -> event_l -> post_after(event_l, ...)   (returns at once)
    poster thread:  wait event_l -> transport.post(...)                   (FIFO, stream order)

Releasing an op that is not posted yet cancels it: the poster never posts a released op, so
a failed transfer starts no write its peer gave up on (``drop_unposted``).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from connectors.transports.base import Batch, TransferOp, TransferStatus, Transport

READY_POLL_S = 1e-4
"""How often the poster thread queries a pending CUDA event."""


@dataclass(slots=True)
class _Op:
    """One batch: what it is (for errors), and its transport handle once posted."""

    label: str
    handle: int | None = None
    error: str | None = None
    stalled: bool = False
    """Injected fault: counts as posted, never settles (until released)."""


@dataclass(frozen=True, slots=True)
class _Queued:
    """A WRITE waiting for its event."""

    op_id: int
    event: Any
    peer: str
    segments: Batch


class Posts:
    """Op ids over one transport, and the thread that posts ops after their CUDA event."""

    def __init__(self, transport: Transport, ready_timeout_s: float) -> None:
        self._transport = transport
        self._ready_timeout_s = ready_timeout_s
        self._lock = threading.Lock()
        self._ops: dict[int, _Op] = {}
        self._ids = itertools.count(1)
        self._queue: queue.SimpleQueue[_Queued | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def post(self, op: TransferOp, peer: str, segments: Batch, label: str) -> int:
        """Post now; a batch the transport refuses is an op that is already FAILED."""
        op_id = self._new(label)
        with self._lock:
            self._start_locked(op_id, op, peer, segments)
        return op_id

    def inject(self, label: str, error: str | None) -> int:
        """An op that already failed with ``error``, or (None) one that stalls forever: what
        an injected ``post`` fault returns instead of posting (connectors/faults.py)."""
        op_id = self._new(label)
        with self._lock:
            self._ops[op_id].error = error
            self._ops[op_id].stalled = error is None
        return op_id

    def post_after(self, event: Any, peer: str, segments: Batch, label: str) -> int:
        """Queue a WRITE that the poster thread posts once ``event`` (``query()``) is done."""
        op_id = self._new(label)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pd-layer-poster",
                                            daemon=True)
            self._thread.start()
        self._queue.put(_Queued(op_id, event, peer, segments))
        return op_id

    def poll(self, op_id: int) -> TransferStatus:
        """PENDING until posted, then the transport's state; FAILED when it could not post."""
        with self._lock:
            op = self._ops[op_id]
            error, handle = op.error, op.handle
        if error is not None:
            return TransferStatus.FAILED
        if handle is None:
            return TransferStatus.PENDING
        return self._transport.poll(handle)

    def error(self, op_id: int) -> str | None:
        """Why an op failed, prefixed with what it was."""
        with self._lock:
            op = self._ops.get(op_id)
        if op is None:
            return None
        reason = op.error
        if reason is None and op.handle is not None:
            reason = self._transport.error(op.handle)
        return None if reason is None else f"{op.label}: {reason}"

    def release(self, op_id: int) -> None:
        """Forget an op; a pending one is cancelled (an unposted one is never posted)."""
        with self._lock:
            op = self._ops.pop(op_id, None)
        if op is not None and op.handle is not None:
            self._transport.release(op.handle)

    def drop_unposted(self, op_ids: list[int]) -> list[int]:
        """Release the ops not posted yet, so they never will be; returns the other ids."""
        with self._lock:
            dropped = {i for i in op_ids if (op := self._ops.get(i)) is not None
                       and op.handle is None and op.error is None and not op.stalled}
            for i in dropped:
                del self._ops[i]
        return [i for i in op_ids if i not in dropped]

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the poster thread (ops still queued are dropped)."""
        self._closed.set()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)

    def _new(self, label: str) -> int:
        with self._lock:
            op_id = next(self._ids)
            self._ops[op_id] = _Op(label)
        return op_id

    def _start_locked(self, op_id: int, op: TransferOp, peer: str,
                      segments: Batch) -> None:
        """Post a live op (under the lock, so a concurrent release cannot miss its handle)."""
        entry = self._ops.get(op_id)
        if entry is None:
            return  # released before it was posted: cancelled
        try:
            entry.handle = self._transport.post(op, peer, segments)
        except Exception as exc:  # the transport refused the batch: fail this op only
            entry.error = f"could not post KV {op.value}: {exc}"

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if not self._closed.is_set() and self._wait_ready(item):
                with self._lock:
                    self._start_locked(item.op_id, TransferOp.WRITE, item.peer, item.segments)

    def _wait_ready(self, item: _Queued) -> bool:
        """Wait for the op's event; past the deadline the op fails (closing: dropped)."""
        deadline = time.monotonic() + self._ready_timeout_s
        while not item.event.query():
            if self._closed.is_set():
                return False
            if time.monotonic() > deadline:
                with self._lock:
                    entry = self._ops.get(item.op_id)
                    if entry is not None:
                        entry.error = (f"its KV was not computed within "
                                       f"{self._ready_timeout_s:.1f} s (CUDA event pending)")
                return False
            time.sleep(READY_POLL_S)
        return True
