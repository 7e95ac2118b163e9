"""The proxy app's shared state, stored under one typed ``web.AppKey``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.bodies import PromptCounter
from proxy.config import ProxyConfig
from proxy.flows import FlowDeps
from proxy.health import Reviver
from proxy.kv_index import KVIndex
from proxy.metrics import ProxyMetrics
from proxy.registry import Pool, Registry
from proxy.scope import BackgroundTasks, RequestScope
from proxy.timings import PhaseReporter


@dataclass(slots=True, eq=False)
class ProxyState:
    """Everything the handlers share; sessions are opened and closed by the app's cleanup_ctx."""

    deps: FlowDeps
    counter: PromptCounter
    kv_index: KVIndex = field(default_factory=KVIndex)
    """What registered instances' prefix caches hold (kv_aware reads it)."""
    sessions: dict[Pool, aiohttp.ClientSession] = field(default_factory=dict)
    probe_session: aiohttp.ClientSession | None = None
    """The health probes' own connections: a probe never queues behind requests for a slot
    (a busy instance would look frozen, and its waiting requests be given up)."""
    started_at_s: int = field(default_factory=lambda: int(time.time()))
    registration_endpoint: str | None = None
    """The ZMQ endpoint instances register at, once bound."""
    reviver: Reviver | None = None
    """The on-demand probes (closed at shutdown)."""

    @property
    def probes(self) -> aiohttp.ClientSession:
        """``probe_session``, which the app's cleanup_ctx opens before anything probes."""
        assert self.probe_session is not None
        return self.probe_session

    @property
    def cfg(self) -> ProxyConfig:
        """The proxy's configuration."""
        return self.deps.cfg

    @property
    def registry(self) -> Registry:
        """Both pools."""
        return self.deps.registry

    @property
    def metrics(self) -> ProxyMetrics:
        """The proxy's counters."""
        return self.deps.metrics

    @property
    def background(self) -> BackgroundTasks:
        """Tasks that outlive a request."""
        return self.deps.background

    @property
    def phases(self) -> PhaseReporter:
        """Observes (and samples into the log) each answered request's TTFT phases."""
        return PhaseReporter(self.metrics, self.cfg.log_request_phases_sample_rate)

    def new_scope(self, request_id: str | None = None) -> RequestScope:
        """Bookkeeping for one client request (``request_id``: its X-Request-Id)."""
        return RequestScope(self.registry, self.sessions, self.background, self.metrics,
                            self.cfg.probe_timeout_s, request_id)


STATE_KEY = web.AppKey("proxy_state", ProxyState)
