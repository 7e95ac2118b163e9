"""Active health checks: every instance's ``/instance_info`` probed on an interval."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from proxy.registry import Instance, Pool, Registry
from proxy.upstream import UpstreamFailure, fetch_instance_info

logger = logging.getLogger(__name__)


async def probe_instance(registry: Registry, session: aiohttp.ClientSession, inst: Instance,
                         timeout_s: float) -> None:
    """Probe one instance and record the verdict in the registry."""
    try:
        info = await fetch_instance_info(session, inst, timeout_s)
    except UpstreamFailure as failure:
        registry.mark_failed(inst, failure.reason, definite=failure.instance_down)
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
    """On-demand probes of a pool with no healthy instance, one round at a time per pool."""

    def __init__(self, registry: Registry, session: Callable[[], aiohttp.ClientSession],
                 timeout_s: float) -> None:
        self._registry = registry
        self._session = session
        self._timeout_s = min(timeout_s, REVIVE_TIMEOUT_S)
        self._rounds: dict[Pool, asyncio.Task[None]] = {}
        self._last_s: dict[Pool, float] = {}

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
    """Forever: drop dynamic instances that stopped heartbeating, probe the rest, sleep."""
    while True:
        registry.expire()
        try:
            await probe_all(registry, session, timeout_s)
        except Exception:  # a bug in one round must not end health checking for good
            logger.exception("health check round failed")
        await asyncio.sleep(interval_s)
