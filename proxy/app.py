"""The proxy's aiohttp application: ``make_app(cfg)`` and ``start_site``.

Start-up order (cleanup_ctx): one client session per pool -> registration socket and a first
health-check round -> background loops. Shutdown runs it backwards: loops cancelled, pending
aborts given a moment to land, sessions closed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from disagg.common.http_server import setup_runner
from disagg.common.logging_setup import log_every
from disagg.common.request_ids import install_request_ids
from proxy.admin import add_admin_routes
from proxy.auth import require_api_key
from proxy.bodies import PromptCounter
from proxy.config import ProxyConfig
from proxy.flows import FlowDeps
from proxy.handlers import add_routes, openai_errors
from proxy.health import Reviver, health_loop, probe_all
from proxy.kv_index import KVIndex
from proxy.local_prefill import LocalPrefillThreshold
from proxy.metrics import ProxyMetrics
from proxy.policies import make_policy
from proxy.registration import Deregister, Heartbeat, KVEvents, RegistrationServer
from proxy.registry import Instance, Origin, Pool, Registry
from proxy.scope import BackgroundTasks
from proxy.state import STATE_KEY, ProxyState
from proxy.stats_logger import ProxyStatsLogger
from proxy.upstream import upstream_headers

logger = logging.getLogger(__name__)

ABORT_DRAIN_TIMEOUT_S = 3.0
"""How long shutdown waits for in-flight abort calls before cancelling them."""


def _upstream_session(cfg: ProxyConfig) -> aiohttp.ClientSession:
    """One pool's session: room for thousands of concurrent streams, no cookies, and the KV
    params key on every call."""
    connector = aiohttp.TCPConnector(limit=cfg.max_upstream_connections, limit_per_host=0,
                                     keepalive_timeout=30.0)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                 headers=upstream_headers(cfg.kv_params_key, cfg.api_key),
                                 timeout=aiohttp.ClientTimeout(
                                     total=None, sock_connect=cfg.connect_timeout_s))


async def _sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    st = app[STATE_KEY]
    for pool in Pool:
        st.sessions[pool] = _upstream_session(st.cfg)
    st.probe_session = probes = _upstream_session(st.cfg)
    yield
    await st.background.close(ABORT_DRAIN_TIMEOUT_S)
    for session in (*st.sessions.values(), probes):
        await session.close()


def _registration_server(st: ProxyState, address: str) -> RegistrationServer:
    def on_heartbeat(msg: Heartbeat) -> None:
        """Register or refresh the sender."""
        st.registry.on_heartbeat(msg)

    def registered(msg: Deregister | KVEvents) -> Instance | None:
        """The instance at the message's URL if it is the engine the message names (anyone
        can reach the socket); None, counted, otherwise."""
        try:
            inst = st.registry.get(msg.http_url)
        except ValueError:
            inst = None
        if inst is None or inst.info is None or inst.info.engine_id != msg.engine_id:
            st.metrics.registration_dropped["unknown_instance"] += 1
            return None
        return inst

    def on_deregister(msg: Deregister) -> None:
        """A dynamic instance leaves now; a static one is marked down until probed. Only the
        engine the proxy knows at that URL may say so (a forged Deregister must not take an
        instance out of its pool)."""
        inst = registered(msg)
        if inst is None:
            return
        if inst.origin is Origin.DYNAMIC:
            st.registry.remove(inst.url)
        else:
            st.registry.mark_failed(inst, "instance deregistered (shutting down)")

    def on_kv_events(msg: KVEvents) -> None:
        """Prefix-cache changes of a registered instance (same engine id) go to the index."""
        inst = registered(msg)
        if inst is not None:
            st.kv_index.apply(inst.url, msg)

    return RegistrationServer(address, on_heartbeat, on_deregister, on_kv_events,
                              st.metrics.registration_dropped, key=st.cfg.registration_key)


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    st = app[STATE_KEY]
    cfg = st.cfg
    server = None
    tasks = []
    if cfg.registration_address:
        server = _registration_server(st, cfg.registration_address)
        try:
            st.registration_endpoint = server.bind()
        except OSError:
            server.close()
            raise
        tasks.append(asyncio.ensure_future(server.serve()))
    # One round before serving, so static instances that are up are routable at once.
    await probe_all(st.registry, st.probes, cfg.probe_timeout_s)
    tasks.append(asyncio.ensure_future(health_loop(st.registry, st.probes,
                                                   cfg.health_check_interval_s,
                                                   cfg.probe_timeout_s)))
    if cfg.log_stats_interval_s is not None:
        tasks.append(asyncio.ensure_future(log_every(
            cfg.log_stats_interval_s, ProxyStatsLogger(st.metrics).line, logger)))
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if st.reviver is not None:
        await st.reviver.close()
    if server is not None:
        server.close()


def make_app(cfg: ProxyConfig) -> web.Application:
    """The proxy as an aiohttp application (static instances registered, nothing started)."""
    kv_index = KVIndex(cfg.kv_index_max_hashes)
    registry = Registry(cfg.mode, cfg.max_missed_heartbeats, cfg.unhealthy_after_failures,
                        on_removed=kv_index.forget)
    for url in cfg.prefill_urls:
        registry.add(url, Pool.PREFILL, Origin.STATIC)
    for url in cfg.decode_urls:
        registry.add(url, Pool.DECODE, Origin.STATIC)
    policies = {pool: make_policy(cfg.policy, pool, index=kv_index) for pool in Pool}
    local = LocalPrefillThreshold(cfg.local_prefill_threshold_tokens,
                                  auto=cfg.local_prefill_auto,
                                  max_tokens=cfg.local_prefill_max_tokens)
    app: web.Application
    reviver = Reviver(registry, lambda: app[STATE_KEY].probes, cfg.probe_timeout_s)
    deps = FlowDeps(cfg=cfg, registry=registry, policies=policies, metrics=ProxyMetrics(),
                    background=BackgroundTasks(), local_prefill=local, revive=reviver.revive,
                    suspect=reviver.suspect)
    app = web.Application(client_max_size=cfg.max_request_body_bytes,
                          middlewares=[require_api_key, openai_errors])
    app[STATE_KEY] = ProxyState(deps=deps, counter=PromptCounter(cfg.model, registry.model_name),
                                kv_index=kv_index, reviver=reviver)
    install_request_ids(app)
    app.cleanup_ctx.append(_sessions_ctx)
    app.cleanup_ctx.append(_background_ctx)
    add_routes(app)
    add_admin_routes(app)
    return app


async def start_site(app: web.Application, host: str, port: int,
                     access_log: bool = False) -> web.AppRunner:
    """Serve ``app`` on host:port; handler cancellation on, so a client hang-up aborts upstream."""
    kwargs: dict[str, Any] = {} if access_log else {"access_log": None}
    runner = await setup_runner(app, handler_cancellation=True, shutdown_timeout=5.0, **kwargs)
    site = web.TCPSite(runner, host, port, backlog=4096)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


def bound_url(runner: web.AppRunner) -> str:
    """``http://host:port`` of the runner's first listening socket (port 0 resolved)."""
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"
