"""Per-request bookkeeping: what a request holds upstream, and undoing it when it fails.

Invariant: a request that did not finish normally calls ``/v1/kv_transfer/abort`` on every
instance it sent a ``transfer_id`` to, so no KV block stays held for a client that is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any

import aiohttp

from proxy.metrics import ProxyMetrics
from proxy.registry import Instance, Pool, Registry
from proxy.upstream import RequestSession, send_abort

logger = logging.getLogger(__name__)


class BackgroundTasks:
    """Tasks the app owns past one request (aborts, trailing prefills); cancelled at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` detached; it is kept referenced and its failure logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.info("background task %s failed: %r", task.get_name(), task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout_s: float) -> None:
        """Let running tasks finish for up to ``timeout_s``, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)


class RequestScope:
    """What one client request holds upstream; ``close()`` releases load and aborts on failure.
    ``request_id`` (its X-Request-Id, disagg/common/request_ids.py) goes with every call."""

    def __init__(self, registry: Registry, sessions: Mapping[Pool, aiohttp.ClientSession],
                 background: BackgroundTasks, metrics: ProxyMetrics, abort_timeout_s: float,
                 request_id: str | None = None):
        self.request_id = request_id
        self._registry = registry
        self._sessions = sessions
        self._background = background
        self._metrics = metrics
        self._abort_timeout_s = abort_timeout_s
        self._holds: list[tuple[Instance, int]] = []
        self._transfers: list[tuple[Instance, str]] = []
        self._owned_tasks: list[asyncio.Task[Any]] = []
        self.succeeded = False
        """Set once the decode response reached the client complete."""

    def session(self, inst: Instance) -> aiohttp.ClientSession | RequestSession:
        """The client session of the instance's pool, bound to this request's id (when it has
        one: every call names it in X-Request-Id)."""
        session = self._sessions[inst.pool]
        return session if self.request_id is None else RequestSession(session, self.request_id)

    def acquire(self, inst: Instance, num_tokens: int) -> None:
        """Count this request's load on ``inst`` until ``release`` or ``close``."""
        self._registry.acquire(inst, num_tokens)
        self._holds.append((inst, num_tokens))

    def release(self, inst: Instance) -> None:
        """Drop this request's load on ``inst``."""
        for hold in [h for h in self._holds if h[0] is inst]:
            self._holds.remove(hold)
            self._registry.release(*hold)

    def note_transfer(self, inst: Instance, transfer_id: str) -> None:
        """``inst`` was sent ``transfer_id``: it may hold KV for it until aborted."""
        self._transfers.append((inst, transfer_id))

    def abort(self, inst: Instance, transfer_id: str) -> None:
        """Abort ``transfer_id`` on ``inst`` now, in the background (never blocks the caller)."""
        if (inst, transfer_id) in self._transfers:
            self._transfers.remove((inst, transfer_id))
        self._metrics.aborts_sent += 1
        coro = send_abort(self.session(inst), inst.url, transfer_id, self._abort_timeout_s)
        self._background.spawn(coro, name=f"abort-{transfer_id}")

    def own(self, task: asyncio.Task[Any]) -> None:
        """A task that must be cancelled if the request fails (a WRITE-mode prefill)."""
        self._owned_tasks.append(task)

    def close(self) -> None:
        """Release all load; if the request did not succeed, cancel its tasks and abort all."""
        for inst, num_tokens in self._holds:
            self._registry.release(inst, num_tokens)
        self._holds.clear()
        if self.succeeded:
            return
        for task in self._owned_tasks:
            task.cancel()
        for inst, transfer_id in list(self._transfers):
            self.abort(inst, transfer_id)
