"""Active health checks: every instance's ``/instance_info`` probed on an interval."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable

import aiohttp

from proxy.registry import Instance, InstanceState, Pool, Registry
from proxy.upstream import UpstreamFailure, fetch_instance_info

logger = logging.getLogger(__name__)


async def probe_instance(registry: Registry, session: aiohttp.ClientSession, inst: Instance,
                         timeout_s: float, *, suspected: bool = False) -> None:
    """Probe one instance and record the verdict in the registry. ``suspected``: a request
    to it just failed too, so a failed probe takes it out of the rotation at once."""
    try:
        info = await fetch_instance_info(session, inst, timeout_s)
    except UpstreamFailure as failure:
        registry.mark_failed(inst, failure.reason, definite=failure.instance_down or suspected)
        if registry.given_up(inst, definite=failure.instance_down):
            inst.down.set()  # dead, or frozen well past a busy instance's slow answer
        return
    registry.apply_info(inst, info)


async def probe_all(registry: Registry, session: aiohttp.ClientSession,
                    timeout_s: float) -> None:
    """Probe every registered instance concurrently (each probe has its own deadline); a
    probe that fails by a bug is logged, and never leaves the others' outcome unread."""
    probes = [probe_instance(registry, session, i, timeout_s)
              for i in registry.instances()]
    for outcome in await asyncio.gather(*probes, return_exceptions=True):
        if isinstance(outcome, Exception):
            logger.error("health probe failed: %s: %s", type(outcome).__name__, outcome)


REVIVE_TIMEOUT_S = 1.0
"""Longest a request waits for the on-demand probe of an empty pool."""
REVIVE_INTERVAL_S = 0.5
"""At most one on-demand probe round per pool this often (all down: no probe storm)."""


class Reviver:
    """On-demand probes: of a pool with no healthy instance (one round at a time per pool),
    and of an instance a request just failed on (one check at a time per instance)."""

    def __init__(self, registry: Registry, session: Callable[[], aiohttp.ClientSession],
                 timeout_s: float) -> None:
        self._registry = registry
        self._session = session
        self._timeout_s = min(timeout_s, REVIVE_TIMEOUT_S)
        self._rounds: dict[Pool, asyncio.Task[None]] = {}
        self._last_s: dict[Pool, float] = {}
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._checked_s: dict[str, float] = {}

    def suspect(self, inst: Instance) -> None:
        """A request to ``inst`` failed in a way that does not prove it down (a timeout, a
        5xx, a decode that heard nothing from this prefill for its lease timeout): probe it
        now, in the background, with the revive deadline (1 s at most: ``/instance_info`` is
        answered by the instance's HTTP loop, not by its engine). If that probe fails too,
        the instance leaves the rotation at once, where the health rounds alone take
        ``unhealthy_after_failures`` rounds (about 8 s for a frozen one); a busy instance
        taken out so is back at its next passing health round. If it answers, nothing
        changes. At most one check per instance at a time, and one every
        ``REVIVE_INTERVAL_S``."""
        if inst.url in self._checks or self._registry.get(inst.url) is not inst \
                or inst.state is not InstanceState.HEALTHY:
            return
        now = time.monotonic()
        if now - self._checked_s.get(inst.url, -REVIVE_INTERVAL_S) < REVIVE_INTERVAL_S:
            return
        self._checked_s[inst.url] = now
        if len(self._checked_s) > 4 * len(self._registry.instances()) + 64:
            self._checked_s = {url: s for url, s in self._checked_s.items()
                               if now - s < REVIVE_INTERVAL_S}  # removed instances go
        task = asyncio.ensure_future(probe_instance(self._registry, self._session(), inst,
                                                    self._timeout_s, suspected=True))
        self._checks[inst.url] = task
        task.add_done_callback(lambda done: self._check_done(inst.url, done))

    def _check_done(self, url: str, task: asyncio.Task[None]) -> None:
        self._checks.pop(url, None)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("probe of suspected instance %s failed: %s: %s", url,
                         type(exc).__name__, exc)

    async def close(self) -> None:
        """Cancel the checks and rounds still running (the app is shutting down)."""
        tasks = [*self._checks.values(), *self._rounds.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def revive(self, pool: Pool) -> None:
        """Probe ``pool``'s instances now (or join the round already running); returns
        within the revive deadline whatever they answer."""
        task = self._rounds.get(pool)
        if task is None:
            now = time.monotonic()
            if now - self._last_s.get(pool, -REVIVE_INTERVAL_S) < REVIVE_INTERVAL_S:
                return
            self._last_s[pool] = now
            task = asyncio.ensure_future(self._round(pool))
            self._rounds[pool] = task
            task.add_done_callback(lambda _: self._rounds.pop(pool, None))
        await asyncio.shield(task)

    async def _round(self, pool: Pool) -> None:
        session = self._session()
        probes = [probe_instance(self._registry, session, inst, self._timeout_s)
                  for inst in self._registry.instances() if inst.pool is pool]
        if probes:
            await asyncio.gather(*probes, return_exceptions=True)


async def health_loop(registry: Registry, session: aiohttp.ClientSession,
                      interval_s: float, timeout_s: float) -> None:
    """Forever, every ``interval_s``: drop dynamic instances that stopped heartbeating and
    probe every instance. Rounds keep their cadence: a frozen instance's probe waiting out its
    deadline holds back neither the others' nor its own next probe (up to
    ceil(timeout / interval) of its probes are in flight), so its failures count once per
    interval, not once per interval + timeout."""
    per_instance = max(1, math.ceil(timeout_s / interval_s))
    probing: dict[str, set[asyncio.Task[None]]] = {}

    def ended(url: str, task: asyncio.Task[None]) -> None:
        tasks = probing.get(url)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del probing[url]
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.error("health probe of %s failed: %s: %s", url, type(exc).__name__, exc)

    try:
        while True:
            try:
                registry.expire()
                for inst in registry.instances():
                    tasks = probing.setdefault(inst.url, set())
                    if len(tasks) < per_instance:
                        task = asyncio.ensure_future(
                            probe_instance(registry, session, inst, timeout_s))
                        tasks.add(task)
                        task.add_done_callback(functools.partial(ended, inst.url))
            except Exception:  # a bug in one round must not end health checking for good
                logger.exception("health check round failed")
            await asyncio.sleep(interval_s)
    finally:
        left = [t for tasks in probing.values() for t in tasks]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
