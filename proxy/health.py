"""Active health checks: every instance's ``/instance_info`` probed on an interval."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from proxy.registry import Instance, Registry
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
    """Probe every registered instance concurrently (each probe has its own deadline)."""
    probes = [probe_instance(registry, session, i, timeout_s)
              for i in registry.instances()]
    if probes:
        await asyncio.gather(*probes)


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
