"""vLLM's periodic stats line, on an instance (off with ``--disable-log-stats``):

    Avg prompt throughput: 812.4 tokens/s, Avg generation throughput: 95.1 tokens/s,
    Running: 12 reqs, Waiting: 0 reqs, KV cache usage: 31.2%, Prefix cache hit rate: 64.0%,
    KV transfers: 40 done, 0 failed, 0 expired, 3 active

Throughputs and the hit rate cover the last interval; the token counters grow when a request
finishes (ServerMetrics), so a long request counts in the interval it ends in. A line is logged
while there is activity, and once more when it stops (the zeros say it stopped).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from disagg.common.protocol import EngineStats
from disagg.server.engine_client import EngineClient
from disagg.server.metrics import ServerMetrics


@dataclass(frozen=True, slots=True)
class _Totals:
    """The counters one line is the difference of."""

    at_s: float
    prompt_tokens: float
    generation_tokens: float
    prefix_queries: float
    prefix_hits: float
    transfers: tuple[float, float, float]
    """(done, failed, expired)."""


def _counter(metrics: ServerMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def _connector_sum(stats: list[EngineStats], key: str) -> float:
    return sum(s.connector.get(key, 0.0) for s in stats)


class InstanceStatsLogger:
    """Makes the line from ServerMetrics' counters and the engine ranks' last stats."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics) -> None:
        self._engine = engine
        self._metrics = metrics
        self._last = self._totals()
        self._was_active = False

    def _totals(self) -> _Totals:
        stats = list(self._engine.stats.values())
        return _Totals(
            at_s=time.monotonic(),
            prompt_tokens=_counter(self._metrics, "disagg_prompt_tokens_total"),
            generation_tokens=_counter(self._metrics, "disagg_generation_tokens_total"),
            prefix_queries=sum(s.prefix_cache_queries for s in stats),
            prefix_hits=sum(s.prefix_cache_hits for s in stats),
            transfers=(_connector_sum(stats, "transfers_done_total"),
                       _connector_sum(stats, "transfers_failed_total"),
                       _connector_sum(stats, "transfers_expired_total")))

    def line(self) -> str | None:
        """The line for the interval since the last call (None while idle)."""
        now, last = self._totals(), self._last
        self._last = now
        stats = list(self._engine.stats.values())
        running = sum(s.num_running for s in stats)
        waiting = sum(s.num_waiting for s in stats)
        moved = [a - b for a, b in zip(now.transfers, last.transfers, strict=True)]
        active_transfers = _connector_sum(stats, "transfers_active")
        active = bool(running or waiting or active_transfers or any(moved)
                      or now.prompt_tokens > last.prompt_tokens
                      or now.generation_tokens > last.generation_tokens)
        if not (active or self._was_active):
            return None
        self._was_active = active
        elapsed_s = max(now.at_s - last.at_s, 1e-9)
        queries = now.prefix_queries - last.prefix_queries
        hit_rate = (now.prefix_hits - last.prefix_hits) / queries if queries > 0 else 0.0
        prompt_tps = (now.prompt_tokens - last.prompt_tokens) / elapsed_s
        generation_tps = (now.generation_tokens - last.generation_tokens) / elapsed_s
        text = (f"Avg prompt throughput: {prompt_tps:.1f} tokens/s, "
                f"Avg generation throughput: {generation_tps:.1f} tokens/s, "
                f"Running: {running} reqs, Waiting: {waiting} reqs, "
                f"KV cache usage: {100 * self._kv_usage(stats):.1f}%, "
                f"Prefix cache hit rate: {100 * hit_rate:.1f}%")
        if any("transfers_active" in s.connector for s in stats):
            text += (f", KV transfers: {moved[0]:.0f} done, {moved[1]:.0f} failed, "
                     f"{moved[2]:.0f} expired, {active_transfers:.0f} active")
        return text

    def _kv_usage(self, stats: list[EngineStats]) -> float:
        """Used fraction of the KV blocks (held and running ones; cached free ones are free)."""
        total = sum(s.kv_blocks_total for s in stats)
        return 1 - sum(s.kv_blocks_free for s in stats) / total if total else 0.0
