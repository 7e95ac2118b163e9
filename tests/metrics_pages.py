"""/metrics pages with every series populated, built in-process: an instance's over a fake
engine client (a READ decode with a connector) and a proxy's over a static 1P1D registry."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from disagg.common.kv_transfer_histograms import observe_transfer
from disagg.common.protocol import EngineStats
from disagg.common.timings import PHASES, InstanceTimings
from disagg.server.metrics import ServerMetrics
from disagg.server.metrics_render import render_instance_metrics
from proxy.config import TransferMode
from proxy.kv_index import KVIndex
from proxy.metrics import Outcome, ProxyMetrics
from proxy.registry import Origin, Pool, Registry


def connector_stats() -> dict[str, float]:
    """A READ decode's connector dict after two transfers (one more failed)."""
    stats = {"bytes_moved_total": 3 * 2**20, "transfers_done_total": 2.0,
             "transfers_failed_total": 1.0, "transfers_expired_total": 0.0,
             "kv_refused_total": 0.0, "transfers_active": 1.0,
             "transfer_seconds_sum": 0.03, "transfer_seconds_count": 2.0}
    observe_transfer(stats, mode="read", role="consumer", seconds=0.01, num_bytes=2**20)
    observe_transfer(stats, mode="read", role="consumer", seconds=0.02, num_bytes=2 * 2**20)
    return stats


def engine_stats(**kw: Any) -> EngineStats:
    """One rank's stats as they reach the frontend."""
    base: dict[str, Any] = {"num_running": 2, "num_waiting": 1, "kv_blocks_total": 64,
                            "kv_blocks_free": 48, "kv_blocks_held": 0, "kv_blocks_cached": 4,
                            "prefix_cache_queries": 100, "prefix_cache_hits": 30,
                            "connector": connector_stats()}
    return EngineStats(**{**base, **kw})


def fake_engine(stats: dict[int, EngineStats]) -> Any:
    """The EngineClient surface the page reads (64 blocks per rank)."""
    synced = SimpleNamespace(max_model_len=256, num_gpu_blocks=64 * max(1, len(stats)),
                             block_size=16, dtype="float32", ready=())
    return SimpleNamespace(synced=synced, stats=stats)


def instance_page(model: str = "m") -> str:
    """An instance's page after one answered request, with a connector."""
    m = ServerMetrics(model)
    m.observe_timings(InstanceTimings(queue_s=0.01, compute_s=0.02, output_s=0.001,
                                      total_s=0.031, kv_transfer_s=0.005))
    m.first_token(0.03)
    m.next_output(0.008)
    m.finished("stop")
    m.tokens(prompt=5, generated=1)
    m.tokens(generated=1)
    m.completed(start_s=0.0, first_s=0.03, end_s=0.04, num_output_tokens=2)
    return render_instance_metrics(fake_engine({0: engine_stats()}), m, model)


def proxy_page() -> str:
    """A proxy's page after one answered request (a retry, a phase each), KV-aware routing."""
    metrics = ProxyMetrics()
    registry = Registry(TransferMode.READ)
    registry.add("http://p0:8000", Pool.PREFILL, Origin.STATIC)
    registry.add("http://d0:8000", Pool.DECODE, Origin.STATIC)
    metrics.count_request("/v1/completions", Outcome.OK)
    metrics.retries["prefill"] += 1
    metrics.aborts_sent += 1
    metrics.registration_dropped["unknown_instance"] += 1
    metrics.time_to_first_byte_s.observe(0.05)
    metrics.prefill_latency_s.observe(0.03)
    metrics.observe_phases(0.05, dict.fromkeys(PHASES, 0.05 / len(PHASES)))
    index = KVIndex()
    index.stale_total["seq_gap"] += 1
    return metrics.render(registry.instances(), index)
