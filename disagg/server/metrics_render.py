"""An instance's /metrics page: the request metrics' registry plus the engine's state, read
from the engine client's last stats of every rank at scrape time (no background thread)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.utils import floatToGoString

from disagg.common.kv_transfer_histograms import (
    BYTES,
    DURATION,
    is_histogram_key,
    transfer_histograms,
)
from disagg.common.protocol import EngineStats
from disagg.server.engine_client import EngineClient
from disagg.server.metrics import ServerMetrics

_MODEL = ("model_name",)
_TRANSFER_FAMILIES = {
    DURATION: ("disagg_kv_transfer_duration_seconds", "KV transfer duration (last post -> "
               "done), per transfer, on the side that posts the ops (READ: decode, WRITE: "
               "prefill)"),
    BYTES: ("disagg_kv_transfer_bytes", "KV bytes moved per transfer, on the same side"),
}


def render_instance_metrics(engine: EngineClient, m: ServerMetrics, model: str) -> str:
    """Prometheus text: requests, latencies, scheduler gauges, KV ledger, cache config,
    connector counters and transfer histograms, process metrics."""
    parts = (m.registry, EngineCollector(engine, model))  # disjoint families: pages concatenate
    return b"".join(generate_latest(part) for part in parts).decode()


def _gauge(name: str, doc: str, value: float, model: str) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=_MODEL)
    g.add_metric([model], value)
    return g


def _counter(name: str, doc: str, value: float, model: str) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=_MODEL)
    c.add_metric([model], value)
    return c


class EngineCollector:
    """The engine's gauges and counters, summed over its data-parallel ranks."""

    def __init__(self, engine: EngineClient, model: str) -> None:
        self.engine = engine
        self.model = model

    def collect(self) -> Iterator[Metric]:
        """Scheduler, KV cache, prefix cache, cache config, connector."""
        stats = list(self.engine.stats.values())
        yield from self._scheduler(stats)
        yield from self._kv_cache(stats)
        yield from self._prefix_cache(stats)
        yield from self._cache_config()
        yield from self._gpu_memory()
        yield from self._connector(stats)

    def _scheduler(self, stats: list[EngineStats]) -> Iterator[Metric]:
        running = sum(s.num_running for s in stats)
        waiting = sum(s.num_waiting for s in stats)
        model = self.model
        yield _gauge("disagg_num_requests_running", "Requests running", running, model)
        yield _gauge("disagg_num_requests_waiting", "Requests waiting", waiting, model)
        yield _gauge("vllm:num_requests_running", "Number of requests in model execution "
                     "batches.", running, model)
        yield _gauge("vllm:num_requests_waiting", "Number of requests waiting to be "
                     "processed.", waiting, model)

    def _kv_cache(self, stats: list[EngineStats]) -> Iterator[Metric]:
        synced = self.engine.synced
        assert synced is not None  # the app is built after the ready handshake
        model = self.model
        free = sum(s.kv_blocks_free for s in stats) if stats else synced.num_gpu_blocks
        total = sum(s.kv_blocks_total for s in stats) if stats else synced.num_gpu_blocks
        yield _gauge("disagg_kv_blocks_total", "KV blocks", total, model)
        yield _gauge("disagg_kv_blocks_free", "Free KV blocks", free, model)
        yield _gauge("disagg_kv_blocks_held", "KV blocks held for a peer transfer",
                     sum(s.kv_blocks_held for s in stats), model)
        yield _gauge("disagg_kv_blocks_cached", "Free KV blocks holding a cached prefix",
                     sum(s.kv_blocks_cached for s in stats), model)
        used = round(1 - free / max(1, synced.num_gpu_blocks), 6) if stats else 0.0
        yield _gauge("disagg_kv_cache_usage_perc", "KV cache usage (0-1)", used, model)
        yield _gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                     used, model)
        yield _gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent "
                     "usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.", used, model)

    def _prefix_cache(self, stats: list[EngineStats]) -> Iterator[Metric]:
        queries = sum(s.prefix_cache_queries for s in stats)
        hits = sum(s.prefix_cache_hits for s in stats)
        model = self.model
        # The disagg names predate prometheus_client, whose counters must end in _total;
        # bench/instance_metrics.py and the tests read them as they are, so they stay untyped.
        for name, doc, value in (
                ("disagg_prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                 "(a counter; typed: vllm:prefix_cache_queries_total)", queries),
                ("disagg_prefix_cache_hits", "Prompt tokens found in the prefix cache (a "
                 "counter; typed: vllm:prefix_cache_hits_total)", hits)):
            u = UnknownMetricFamily(name, doc, labels=_MODEL)
            u.add_metric([model], value)
            yield u
        yield _counter("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of "
                       "number of queried tokens.", queries, model)
        yield _counter("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number "
                       "of cached tokens.", hits, model)

    def _cache_config(self) -> Iterator[Metric]:
        synced = self.engine.synced
        assert synced is not None
        cache_dtype = (synced.ready[0].kv_cache_dtype if synced.ready else None) or synced.dtype
        info = {"block_size": str(synced.block_size),
                "num_gpu_blocks": str(synced.num_gpu_blocks),
                "max_model_len": str(synced.max_model_len), "cache_dtype": cache_dtype}
        g = GaugeMetricFamily("disagg_cache_config_info", "Synced cache configuration",
                              labels=list(info))
        g.add_metric(list(info.values()), 1)
        yield g
        vllm_info = {**info, "model_name": self.model}
        g = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine "
                              "CacheConfig", labels=list(vllm_info))
        g.add_metric(list(vllm_info.values()), 1)
        yield g

    def _gpu_memory(self) -> Iterator[Metric]:
        """Each engine core's GPU memory split from its ready handshake (GPU only)."""
        synced = self.engine.synced
        ranks = [(r.dp_rank, r.memory_bytes) for r in (synced.ready if synced else ())
                 if r.memory_bytes]
        if not ranks:
            return
        g = GaugeMetricFamily("disagg_gpu_memory_bytes", "GPU memory of an engine core at "
                              "start-up by part: budget (--gpu-memory-utilization x total), "
                              "weights, kv, graphs, activations, other, and held (what the "
                              "driver counts for the process)",
                              labels=["model_name", "dp_rank", "part"])
        for rank, parts in ranks:
            for part, value in parts.items():
                g.add_metric([self.model, str(rank), part], value)
        yield g

    def _connector(self, stats: list[EngineStats]) -> Iterator[Metric]:
        summed: dict[str, float] = {}
        for s in stats:
            for key, value in s.connector.items():
                summed[key] = summed.get(key, 0.0) + value
        yield from connector_families(summed, self.model)


def connector_families(summed: dict[str, float], model: str) -> Iterator[Metric]:
    """The connector's rank-summed dict: ``*_total`` keys are counters, the
    ``transfer_seconds_sum``/``_count`` pair a summary, the rest gauges (each
    ``disagg_kv_connector_<key>`` as before), then the per-transfer histograms."""
    plain = {k: v for k, v in summed.items() if not is_histogram_key(k)}
    if "transfer_seconds_sum" in plain or "transfer_seconds_count" in plain:
        s = SummaryMetricFamily("disagg_kv_connector_transfer_seconds",
                                "KV connector transfer_seconds (last post -> done)",
                                labels=_MODEL)
        s.add_metric([model], int(plain.pop("transfer_seconds_count", 0.0)),
                     plain.pop("transfer_seconds_sum", 0.0))
        yield s
    for key, value in sorted(plain.items()):
        name, doc = f"disagg_kv_connector_{key}", f"KV connector {key}"
        yield _counter(name, doc, value, model) if key.endswith("_total") \
            else _gauge(name, doc, value, model)
    yield from _transfer_histograms(summed, model)


def _transfer_histograms(summed: dict[str, float], model: str) -> Iterator[Metric]:
    """Both families always (no transfer yet: no series), by mode and role."""
    families = {key: HistogramMetricFamily(name, doc, labels=("model_name", "mode", "role"))
                for key, (name, doc) in _TRANSFER_FAMILIES.items()}
    for h in transfer_histograms(summed):
        buckets = [(floatToGoString(bound), count) for bound, count in h.cumulative]
        families[h.name].add_metric([model, h.mode, h.role], buckets, h.total)
    yield from families.values()
