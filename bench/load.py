"""Load generation: Poisson/gamma arrivals, a concurrency cap, one shared HTTP session.

Arrivals follow ``vllm bench serve``: gaps are gamma distributed with shape ``burstiness`` and
mean ``1 / request_rate`` (burstiness 1 = Poisson; < 1 burstier; > 1 more uniform). The
concurrency cap is a semaphore taken when a request is due, so a capped run at an infinite rate
keeps exactly ``max_concurrency`` requests in flight.

A chain (``RequestChain``) is a run of requests that must go one after another, each built
from the answer to the one before (the turns of a conversation): arrivals and the cap then
count chains, and a chain holds its slot from its first request to its last answer.
"""

from __future__ import annotations

import asyncio
import math
import resource
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import numpy as np
from tqdm import tqdm

from bench.client import RequestInput, RequestOutput, send_request

_LAG_PROBE_INTERVAL_S = 0.01
_UNCAPPED_FDS = 65536  # an uncapped run may open one socket per request
_SPARE_FDS = 256  # files, pipes and the event loop's own descriptors


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadConfig:
    """How requests are offered to the server."""

    request_rate: float = math.inf
    """Mean requests per second; inf sends everything at once."""
    burstiness: float = 1.0
    """Gamma shape of the inter-arrival gaps; 1.0 is a Poisson process."""
    max_concurrency: int | None = None
    """Most requests (chains: conversations) in flight at once; None = no cap."""
    seed: int = 0
    """Seed of the arrival process."""
    request_timeout_s: float = 3600.0
    """Deadline of each request, stream included."""
    show_progress: bool = True
    """Draw a tqdm bar (only when stderr is a terminal)."""


@dataclass(slots=True)
class RunOutcome:
    """The timed part of one benchmark point."""

    outputs: list[RequestOutput]
    duration_s: float
    bench_start_s: float
    client_cpu_s: float
    """``time.process_time`` spent by this process during the timed part."""
    loop_lag_ms: list[float] = field(default_factory=list)
    """How late each 10 ms event-loop probe woke up: high values mean the client is the
    bottleneck and its timestamps are late."""


class RequestChain(Protocol):
    """Requests sent one after another; each next one may depend on the last answer."""

    @property
    def num_requests(self) -> int:
        """How many requests the chain sends when none fails (for the progress bar)."""
        ...

    def first(self) -> RequestInput:
        """The first request."""
        ...

    def next(self, out: RequestOutput) -> RequestInput | None:
        """The request after ``out`` (the last one's output), or None when the chain is done."""
        ...


@dataclass(frozen=True, slots=True)
class SingleRequest:
    """A chain of one independent request."""

    req: RequestInput
    num_requests: int = 1

    def first(self) -> RequestInput:
        """The request."""
        return self.req

    def next(self, out: RequestOutput) -> RequestInput | None:
        """Nothing follows."""
        return None


def arrival_offsets_s(num_requests: int, request_rate: float, burstiness: float,
                      seed: int) -> list[float]:
    """Send time of each request relative to the start; the first one goes at 0."""
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    scale_s = 1.0 / (request_rate * burstiness)
    gaps_s = rng.gamma(shape=burstiness, scale=scale_s, size=max(0, num_requests - 1))
    return [0.0, *np.cumsum(gaps_s).tolist()][:num_requests]


def raise_open_file_limit(num_fds: int) -> int:
    """Lift the soft open-file limit toward ``num_fds`` (up to the hard limit); returns it.

    Each stream holds a socket: the common 1,024 default would fail a 1,024-stream run.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = num_fds if hard == resource.RLIM_INFINITY else min(num_fds, hard)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft


def make_session(max_concurrency: int | None) -> aiohttp.ClientSession:
    """One session for the whole run; its pool holds one connection per concurrent stream."""
    limit = max_concurrency or 0  # 0 = no limit, for uncapped rate-driven runs
    raise_open_file_limit((max_concurrency or _UNCAPPED_FDS) + _SPARE_FDS)
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ttl_dns_cache=300,
                                     keepalive_timeout=60)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                 trust_env=False)


async def _probe_loop_lag(lags_ms: list[float], stop: asyncio.Event) -> None:
    """Record how late the event loop wakes a 10 ms sleeper until ``stop`` is set."""
    while not stop.is_set():
        due_s = time.perf_counter() + _LAG_PROBE_INTERVAL_S
        await asyncio.sleep(_LAG_PROBE_INTERVAL_S)
        lags_ms.append(max(0.0, time.perf_counter() - due_s) * 1000)


async def _limited(sem: asyncio.Semaphore | None, session: aiohttp.ClientSession,
                   req: RequestInput, timeout_s: float) -> RequestOutput:
    """Send one request under the concurrency cap."""
    if sem is None:
        return await send_request(session, req, timeout_s)
    async with sem:
        return await send_request(session, req, timeout_s)


async def run_batch(session: aiohttp.ClientSession, inputs: list[RequestInput],
                    max_concurrency: int | None, timeout_s: float) -> list[RequestOutput]:
    """Send ``inputs`` all at once under a cap, untimed (warm-up requests)."""
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    return list(await asyncio.gather(*(_limited(sem, session, req, timeout_s)
                                       for req in inputs)))


async def _run_chain(sem: asyncio.Semaphore | None, session: aiohttp.ClientSession,
                     chain: RequestChain, timeout_s: float,
                     on_output: Callable[[], object]) -> list[RequestOutput]:
    """Send a chain's requests in order under one slot of the cap."""
    slot: AbstractAsyncContextManager[object] = sem if sem is not None else nullcontext()
    outputs = []
    async with slot:
        req: RequestInput | None = chain.first()
        while req is not None:
            out = await send_request(session, req, timeout_s)
            outputs.append(out)
            on_output()
            req = chain.next(out)
    return outputs


async def run_load(session: aiohttp.ClientSession, inputs: list[RequestInput],
                   load: LoadConfig) -> RunOutcome:
    """Offer independent ``inputs`` on the arrival schedule; outputs in input order."""
    return await run_chains(session, [SingleRequest(req) for req in inputs], load)


async def run_chains(session: aiohttp.ClientSession, chains: list[RequestChain],
                     load: LoadConfig) -> RunOutcome:
    """Start ``chains`` on the arrival schedule; outputs chain by chain, each in send order."""
    offsets_s = arrival_offsets_s(len(chains), load.request_rate, load.burstiness, load.seed)
    sem = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    bar = tqdm(total=sum(c.num_requests for c in chains),
               disable=not (load.show_progress and sys.stderr.isatty()))
    lags_ms: list[float] = []
    stop = asyncio.Event()
    lag_task = asyncio.create_task(_probe_loop_lag(lags_ms, stop))
    cpu_start_s = time.process_time()
    start_s = time.perf_counter()
    tasks = []
    for chain, offset_s in zip(chains, offsets_s, strict=True):
        delay_s = start_s + offset_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(
            _run_chain(sem, session, chain, load.request_timeout_s, lambda: bar.update(1))))
    outputs = [out for outs in await asyncio.gather(*tasks) for out in outs]
    duration_s = time.perf_counter() - start_s
    client_cpu_s = time.process_time() - cpu_start_s
    stop.set()
    await lag_task
    bar.close()
    return RunOutcome(outputs, duration_s, start_s, client_cpu_s, lags_ms)
