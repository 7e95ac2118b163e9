"""The proxy's own Prometheus metrics on prometheus_client, in a registry of its own (several
proxies live in one test process, so the global default registry is never used).

The request path bumps plain counters (read at scrape time) and observes histograms; the
instances' and the KV index's state is read when the page is rendered.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from disagg.common.timings import PHASES
from proxy.kv_index import KVIndex
from proxy.registry import Instance, InstanceState

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0, 120.0)


class Outcome(enum.Enum):
    """How a client request ended."""

    OK = "ok"
    REJECTED = "rejected"
    """A 4xx: the request itself was refused (by the proxy or an instance)."""
    UNAVAILABLE = "unavailable"
    """503: no instance to send it to."""
    FAILED = "failed"
    """Upstream failures used up the retries, or a stream broke mid-way."""
    CLIENT_GONE = "client_gone"
    """The client disconnected first."""


def _counter(name: str, doc: str, labels: tuple[str, ...],
             values: dict[tuple[str, ...], float]) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        c.add_metric(list(key), value)
    return c


def _gauge(name: str, doc: str, labels: tuple[str, ...],
           values: dict[tuple[str, ...], float]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        g.add_metric(list(key), value)
    return g


Family = Callable[[str, str, tuple[str, ...], dict[tuple[str, ...], float]], Metric]


class ProxyMetrics:
    """What the request path counts and observes; rendered on ``GET /metrics``."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        """(route, outcome) -> finished client requests."""
        self.retries: Counter[str] = Counter()
        self.aborts_sent = 0
        self.local_prefills = 0
        self.local_prefill_threshold_tokens = 0
        """The threshold the last routed request saw (fixed, or ``auto``'s learned one)."""
        self.in_flight = 0
        self.registration_dropped: Counter[str] = Counter()
        """Registration frames dropped, by reason (proxy/registration.py, unknown_instance)."""
        self.registry = reg = CollectorRegistry()
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        reg.register(self)

        def hist(name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS_S, registry=reg)

        self.time_to_first_byte_s = hist("disagg_proxy_time_to_first_byte_seconds",
                                         "Received -> first byte of the answer sent")
        self.prefill_latency_s = hist("disagg_proxy_prefill_seconds",
                                      "Prefill call sent -> answered")
        self.ttft_s = hist("disagg_proxy_time_to_first_token_seconds",
                           "Received -> first token handed to the client "
                           "(disagg/common/timings.py)")
        phases = hist("disagg_proxy_request_phase_seconds",
                      "Time to first token by phase (proxy_queue, prefill_queue, "
                      "prefill_compute, kv_transfer, decode_admission, first_token; they sum "
                      "to the TTFT)", ("phase",))
        self.phase_s = {name: phases.labels(name) for name in PHASES}
        """TTFT by phase (disagg/common/timings.py), each request once."""

    def count_request(self, route: str, outcome: Outcome) -> None:
        """One finished client request."""
        self.requests[(route, outcome.value)] += 1

    def observe_phases(self, ttft_s: float | None, phases: dict[str, float | None]) -> None:
        """One answered request's TTFT and phases (None: not known, not observed)."""
        if ttft_s is not None:
            self.ttft_s.observe(ttft_s)
        for name, value in phases.items():
            if value is not None:
                self.phase_s[name].observe(value)

    def collect(self) -> Iterator[Metric]:
        """The plain counters and the in-flight gauge (this object is a collector of its own
        registry)."""
        yield _counter("disagg_proxy_requests_total", "Client requests by route and outcome",
                       ("route", "outcome"), {k: float(n) for k, n in self.requests.items()})
        yield _counter("disagg_proxy_retries_total", "Calls retried on another instance",
                       ("pool",), {(p,): n for p, n in self.retries.items()})
        yield _counter("disagg_proxy_aborts_sent_total", "Aborts sent to instances", (),
                       {(): self.aborts_sent})
        yield _counter("disagg_proxy_local_prefill_total", "Requests the decode prefilled "
                       "itself (--local-prefill-threshold)", (), {(): self.local_prefills})
        yield _gauge("disagg_proxy_local_prefill_threshold_tokens", "Prompts shorter than this "
                     "go to a decode alone (--local-prefill-threshold; auto: learned)", (),
                     {(): self.local_prefill_threshold_tokens})
        yield _gauge("disagg_proxy_requests_in_flight", "Client requests being served", (),
                     {(): self.in_flight})
        yield _counter("disagg_proxy_registration_dropped_total", "Registration frames "
                       "dropped, by reason", ("reason",),
                       {(r,): n for r, n in self.registration_dropped.items()})

    def render(self, instances: list[Instance], kv_index: KVIndex | None = None) -> str:
        """The full Prometheus text."""
        parts = (self.registry, StateCollector(instances, kv_index))  # disjoint families
        return b"".join(generate_latest(part) for part in parts).decode()


class StateCollector:
    """The KV-aware index and the per-instance gauges, as they are at scrape time."""

    def __init__(self, instances: list[Instance], kv_index: KVIndex | None) -> None:
        self.instances = instances
        self.kv_index = kv_index

    def collect(self) -> Iterator[Metric]:
        """KV index (when routing is KV-aware), then one series per instance."""
        index = self.kv_index
        if index is not None:
            yield _gauge("disagg_proxy_kv_index_hashes", "Block hashes in the KV-aware index",
                         (), {(): index.num_hashes})
            yield _gauge("disagg_proxy_kv_index_fresh_instances", "Instances whose view is "
                         "fresh", (), {(): index.num_fresh()})
            yield _counter("disagg_proxy_kv_index_stale_total", "Instance views made stale, "
                           "by reason", ("reason",),
                           {(r,): n for r, n in index.stale_total.items()})
        yield from self._instances()

    def _instances(self) -> Iterator[Metric]:
        families: tuple[tuple[str, str, Family, Callable[[Instance], float]], ...] = (
            ("disagg_proxy_instance_healthy", "1 if the instance takes requests", _gauge,
             lambda i: int(i.state is InstanceState.HEALTHY)),
            ("disagg_proxy_instance_outstanding_requests", "Requests sent and not answered",
             _gauge, lambda i: i.outstanding_requests),
            ("disagg_proxy_instance_outstanding_tokens", "Prompt tokens of those requests",
             _gauge, lambda i: i.outstanding_tokens),
            ("disagg_proxy_instance_requests_total", "Requests sent to the instance",
             _counter, lambda i: i.total_requests))
        for name, doc, family, value in families:
            yield family(name, doc, ("pool", "url"),
                         {(i.pool.value, i.url): value(i) for i in self.instances})
