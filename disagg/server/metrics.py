"""Prometheus text exposition without a client library: counters, gauges, histograms."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from disagg.common.timings import INSTANCE_PHASES, InstanceTimings

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(slots=True)
class Histogram:
    """Cumulative-bucket histogram of seconds."""

    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    num: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value_s: float) -> None:
        """Record one observation."""
        self.counts[bisect.bisect_left(self.buckets, value_s)] += 1
        self.total += value_s
        self.num += 1

    def render(self) -> list[str]:
        """Exposition lines."""
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram",
                *self.samples()]

    def samples(self, labels: str = "") -> list[str]:
        """The sample lines; ``labels`` (``phase="queue"``) goes into every one."""
        sep = "," if labels else ""
        lines = []
        acc = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            acc += count
            lines.append(f'{self.name}_bucket{{{labels}{sep}le="{bound}"}} {acc}')
        lines.append(f'{self.name}_bucket{{{labels}{sep}le="+Inf"}} {self.num}')
        tail = f"{{{labels}}}" if labels else ""
        lines += [f"{self.name}_sum{tail} {self.total}", f"{self.name}_count{tail} {self.num}"]
        return lines


@dataclass(slots=True)
class HistogramFamily:
    """Histograms of one name told apart by one label (``phase="queue"``), every value
    exported from the start (zero counts included)."""

    name: str
    help: str
    label: str
    values: tuple[str, ...]
    series: dict[str, Histogram] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.series = {v: Histogram(self.name, self.help) for v in self.values}

    def observe(self, value: str, seconds: float) -> None:
        """Record one observation under label ``value``."""
        self.series[value].observe(seconds)

    def render(self) -> list[str]:
        """Exposition lines: HELP and TYPE once, then each series."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for value, hist in self.series.items():
            lines += hist.samples(f'{self.label}="{value}"')
        return lines


@dataclass(slots=True)
class ServerMetrics:
    """Request-level metrics of one instance."""

    requests_total: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(
        "disagg_time_to_first_token_seconds", "Time to first token"))
    tpot: Histogram = field(default_factory=lambda: Histogram(
        "disagg_time_per_output_token_seconds", "Time per output token after the first"))
    e2e: Histogram = field(default_factory=lambda: Histogram(
        "disagg_e2e_request_latency_seconds", "End-to-end request latency"))
    phases: HistogramFamily = field(default_factory=lambda: HistogramFamily(
        "disagg_request_phase_seconds", "Time to first token by phase: queue (received -> "
        "first scheduled), compute (-> first token), output (-> first token written), "
        "kv_transfer (posted -> done, on the side that moves the KV)", "phase",
        INSTANCE_PHASES))

    def finished(self, reason: str) -> None:
        """Count a finished request by finish reason."""
        self.requests_total[reason] = self.requests_total.get(reason, 0) + 1

    def observe_timings(self, t: InstanceTimings) -> None:
        """One request's phases (disagg/common/timings.py); no transfer, no kv_transfer."""
        self.phases.observe("queue", t.queue_s)
        self.phases.observe("compute", t.compute_s)
        self.phases.observe("output", t.output_s)
        if t.kv_transfer_s is not None:
            self.phases.observe("kv_transfer", t.kv_transfer_s)


def gauge(name: str, help_text: str, value: float, labels: str = "") -> list[str]:
    """Lines for one gauge sample."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{labels} {value}"]


def counter(name: str, help_text: str, samples: dict[str, float]) -> list[str]:
    """Lines for a counter with optional label strings as keys ('' = no labels)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
    lines += [f"{name}{labels} {value}" for labels, value in samples.items()]
    return lines
