"""The proxy's own Prometheus metrics, rendered as text without a client library."""

from __future__ import annotations

import bisect
import enum
from collections import Counter
from dataclasses import dataclass, field

from disagg.common.timings import PHASES
from proxy.kv_index import KVIndex
from proxy.registry import Instance, InstanceState

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
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


@dataclass(slots=True)
class Histogram:
    """A cumulative Prometheus histogram."""

    buckets: tuple[float, ...] = _LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(_LATENCY_BUCKETS_S) + 1))
    total: float = 0.0
    num: int = 0

    def observe(self, value: float) -> None:
        """Record one sample."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.num += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        """Exposition lines for this histogram; ``labels`` (``phase="x"``) goes in each."""
        lines, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            lines.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {running}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.num}')
        tail = f"{{{labels}}}" if labels else ""
        lines += [f"{name}_sum{tail} {self.total}", f"{name}_count{tail} {self.num}"]
        return lines


@dataclass(slots=True)
class ProxyMetrics:
    """Counters the request path bumps; rendered on ``GET /metrics``."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    aborts_sent: int = 0
    local_prefills: int = 0
    local_prefill_threshold_tokens: int = 0
    """The threshold the last routed request saw (fixed, or ``auto``'s learned one)."""
    in_flight: int = 0
    time_to_first_byte_s: Histogram = field(default_factory=Histogram)
    prefill_latency_s: Histogram = field(default_factory=Histogram)
    registration_dropped: Counter[str] = field(default_factory=Counter)
    """Registration frames dropped, by reason (proxy/registration.py, unknown_instance)."""
    ttft_s: Histogram = field(default_factory=Histogram)
    """Received -> first token handed to the client (disagg/common/timings.py)."""
    phase_s: dict[str, Histogram] = field(
        default_factory=lambda: {name: Histogram() for name in PHASES})
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

    def render(self, instances: list[Instance], kv_index: KVIndex | None = None) -> str:
        """The full Prometheus text."""
        lines = ["# TYPE disagg_proxy_requests_total counter"]
        lines += [f'disagg_proxy_requests_total{{route="{r}",outcome="{o}"}} {n}'
                  for (r, o), n in sorted(self.requests.items())]
        lines.append("# TYPE disagg_proxy_retries_total counter")
        lines += [f'disagg_proxy_retries_total{{pool="{p}"}} {n}'
                  for p, n in sorted(self.retries.items())]
        lines += ["# TYPE disagg_proxy_aborts_sent_total counter",
                  f"disagg_proxy_aborts_sent_total {self.aborts_sent}",
                  "# TYPE disagg_proxy_local_prefill_total counter",
                  f"disagg_proxy_local_prefill_total {self.local_prefills}",
                  "# TYPE disagg_proxy_local_prefill_threshold_tokens gauge",
                  "disagg_proxy_local_prefill_threshold_tokens "
                  f"{self.local_prefill_threshold_tokens}",
                  "# TYPE disagg_proxy_requests_in_flight gauge",
                  f"disagg_proxy_requests_in_flight {self.in_flight}",
                  "# TYPE disagg_proxy_time_to_first_byte_seconds histogram",
                  *self.time_to_first_byte_s.render("disagg_proxy_time_to_first_byte_seconds"),
                  "# TYPE disagg_proxy_prefill_seconds histogram",
                  *self.prefill_latency_s.render("disagg_proxy_prefill_seconds"),
                  "# TYPE disagg_proxy_time_to_first_token_seconds histogram",
                  *self.ttft_s.render("disagg_proxy_time_to_first_token_seconds"),
                  "# HELP disagg_proxy_request_phase_seconds Time to first token by phase "
                  "(proxy_queue, prefill_queue, prefill_compute, kv_transfer, "
                  "decode_admission, first_token; they sum to the TTFT)",
                  "# TYPE disagg_proxy_request_phase_seconds histogram",
                  *(line for name, hist in self.phase_s.items() for line in hist.render(
                      "disagg_proxy_request_phase_seconds", f'phase="{name}"')),
                  "# TYPE disagg_proxy_registration_dropped_total counter"]
        lines += [f'disagg_proxy_registration_dropped_total{{reason="{r}"}} {n}'
                  for r, n in sorted(self.registration_dropped.items())]
        if kv_index is not None:
            lines += _kv_index_lines(kv_index)
        return "\n".join(lines + _instance_lines(instances)) + "\n"


def _kv_index_lines(index: KVIndex) -> list[str]:
    """The KV-aware index's size, fresh views, and views made stale."""
    return ["# TYPE disagg_proxy_kv_index_hashes gauge",
            f"disagg_proxy_kv_index_hashes {index.num_hashes}",
            "# TYPE disagg_proxy_kv_index_fresh_instances gauge",
            f"disagg_proxy_kv_index_fresh_instances {index.num_fresh()}",
            "# TYPE disagg_proxy_kv_index_stale_total counter",
            *[f'disagg_proxy_kv_index_stale_total{{reason="{r}"}} {n}'
              for r, n in sorted(index.stale_total.items())]]


def _instance_lines(instances: list[Instance]) -> list[str]:
    """Per-instance gauges (one family after the other, as the text format requires)."""
    families = (("disagg_proxy_instance_healthy", "gauge",
                 lambda i: int(i.state is InstanceState.HEALTHY)),
                ("disagg_proxy_instance_outstanding_requests", "gauge",
                 lambda i: i.outstanding_requests),
                ("disagg_proxy_instance_outstanding_tokens", "gauge",
                 lambda i: i.outstanding_tokens),
                ("disagg_proxy_instance_requests_total", "counter", lambda i: i.total_requests))
    lines = []
    for name, kind, value in families:
        lines.append(f"# TYPE {name} {kind}")
        lines += [f'{name}{{pool="{i.pool.value}",url="{i.url}"}} {value(i)}' for i in instances]
    return lines
