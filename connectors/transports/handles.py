"""Handle bookkeeping shared by every transport: state, error, peer and deadline per batch.

A transport's worker threads (or its poll of a native library) move a handle from PENDING to
DONE or FAILED exactly once; later calls are ignored, so a late completion can never revive a
handle that was already failed (peer removed, deadline passed, released).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from connectors.transports.base import TransferStatus


@dataclass(slots=True)
class HandleState:
    """One posted batch as the transport sees it."""

    peer_name: str
    deadline_s: float | None
    """``time.monotonic()`` after which a PENDING batch is failed; None = no backstop."""
    status: TransferStatus = TransferStatus.PENDING
    error: str | None = None
    context: Any = None
    """Transport-specific state (native handle, CUDA events, sockets in use, ...)."""
    cancel_hooks: list[Any] = field(default_factory=list)
    """Callables run once when the handle fails or is released while PENDING."""


class HandleTable:
    """Thread-safe map from integer handles to :class:`HandleState`."""

    def __init__(self, op_timeout_s: float | None) -> None:
        self._lock = threading.Lock()
        self._states: dict[int, HandleState] = {}
        self._ids = itertools.count(1)
        self._timeout_s = op_timeout_s

    def new(self, peer_name: str, context: Any = None) -> int:
        """Register a PENDING batch towards ``peer_name``; returns its handle."""
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        with self._lock:
            handle = next(self._ids)
            self._states[handle] = HandleState(peer_name, deadline, context=context)
        return handle

    def get(self, handle: int) -> HandleState:
        """State of a live handle; KeyError with a clear message when unknown."""
        with self._lock:
            state = self._states.get(handle)
        if state is None:
            raise KeyError(f"unknown or released transfer handle {handle}")
        return state

    def add_cancel_hook(self, handle: int, hook: Any) -> bool:
        """Attach a hook run when the batch is abandoned; False if it already finished."""
        with self._lock:
            state = self._states.get(handle)
            if state is None or state.status is not TransferStatus.PENDING:
                return False
            state.cancel_hooks.append(hook)
            return True

    def remove_cancel_hook(self, handle: int, hook: Any) -> None:
        """Detach a hook once the resource it guards is no longer in use."""
        with self._lock:
            state = self._states.get(handle)
            if state is not None and hook in state.cancel_hooks:
                state.cancel_hooks.remove(hook)

    def finish(self, handle: int, error: str | None = None) -> bool:
        """Move a PENDING batch to DONE (``error`` None) or FAILED; False if not PENDING."""
        with self._lock:
            state = self._states.get(handle)
            if state is None or state.status is not TransferStatus.PENDING:
                return False
            state.status = TransferStatus.DONE if error is None else TransferStatus.FAILED
            state.error = error
            hooks = list(state.cancel_hooks) if error is not None else []
            state.cancel_hooks.clear()
        _run_hooks(hooks)
        return True

    def status(self, handle: int) -> TransferStatus:
        """Current state, failing a PENDING batch whose backstop deadline has passed."""
        state = self.get(handle)
        if (state.status is TransferStatus.PENDING and state.deadline_s is not None
                and time.monotonic() > state.deadline_s):
            self.finish(handle, f"transfer still pending after {self._timeout_s:.1f} s "
                                f"(transport op_timeout_s) towards {state.peer_name!r}")
        return state.status

    def error(self, handle: int) -> str | None:
        """Why a FAILED batch failed (None when unknown or not failed)."""
        with self._lock:
            state = self._states.get(handle)
        return None if state is None else state.error

    def pop(self, handle: int) -> HandleState | None:
        """Forget a handle, running its cancel hooks if it was still PENDING."""
        with self._lock:
            state = self._states.pop(handle, None)
            hooks: list[Any] = []
            if state is not None and state.status is TransferStatus.PENDING:
                state.status = TransferStatus.FAILED
                state.error = "released while pending"
                hooks = list(state.cancel_hooks)
                state.cancel_hooks.clear()
        _run_hooks(hooks)
        return state

    def fail_peer(self, peer_name: str, error: str) -> list[int]:
        """Fail every PENDING batch towards ``peer_name``; returns their handles."""
        with self._lock:
            handles = [h for h, s in self._states.items()
                       if s.peer_name == peer_name and s.status is TransferStatus.PENDING]
        return [h for h in handles if self.finish(h, error)]

    def fail_all(self, error: str) -> None:
        """Fail every PENDING batch (transport closing)."""
        with self._lock:
            handles = list(self._states)
        for handle in handles:
            self.finish(handle, error)

    def states(self) -> list[tuple[int, HandleState]]:
        """Every live handle with its state (for cleanup of native resources)."""
        with self._lock:
            return list(self._states.items())


def _run_hooks(hooks: list[Any]) -> None:
    """Run cancel hooks outside the table lock; a failing hook must not stop the others."""
    for hook in hooks:
        # Best effort: the socket a hook aborts may already be closed.
        with contextlib.suppress(Exception):
            hook()
