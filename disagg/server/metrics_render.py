"""Renders an instance's /metrics page from the engine client's synced config and stats."""

from __future__ import annotations

from disagg.server.engine_client import EngineClient
from disagg.server.metrics import ServerMetrics, counter, gauge


def render_instance_metrics(engine: EngineClient, m: ServerMetrics, model: str) -> str:
    """Prometheus text: requests, latencies, scheduler gauges, KV ledger, cache config."""
    synced = engine.synced
    assert synced is not None
    stats = list(engine.stats.values())
    lab = f'{{model_name="{model}"}}'
    lines = counter("disagg_request_success_total", "Finished requests by reason",
                    {f'{{finished_reason="{k}"}}': v for k, v in m.requests_total.items()}
                    or {"": 0})
    lines += counter("disagg_prompt_tokens_total", "Prefill tokens", {"": m.prompt_tokens})
    lines += counter("disagg_generation_tokens_total", "Generated tokens",
                     {"": m.generation_tokens})
    for hist in (m.ttft, m.tpot, m.e2e):
        lines += hist.render()
    lines += m.phases.render()
    lines += gauge("disagg_num_requests_running", "Requests running",
                   sum(s.num_running for s in stats), lab)
    lines += gauge("disagg_num_requests_waiting", "Requests waiting",
                   sum(s.num_waiting for s in stats), lab)
    lines += gauge("disagg_kv_blocks_total", "KV blocks", sum(s.kv_blocks_total for s in stats)
                   if stats else synced.num_gpu_blocks, lab)
    lines += gauge("disagg_kv_blocks_free", "Free KV blocks", sum(s.kv_blocks_free for s in stats)
                   if stats else synced.num_gpu_blocks, lab)
    lines += gauge("disagg_kv_blocks_held", "KV blocks held for a peer transfer",
                   sum(s.kv_blocks_held for s in stats), lab)
    lines += gauge("disagg_kv_blocks_cached", "Free KV blocks holding a cached prefix",
                   sum(s.kv_blocks_cached for s in stats), lab)
    lines += counter("disagg_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                     {lab: sum(s.prefix_cache_queries for s in stats)})
    lines += counter("disagg_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                     {lab: sum(s.prefix_cache_hits for s in stats)})
    used = 1 - (sum(s.kv_blocks_free for s in stats) / max(1, synced.num_gpu_blocks)) \
        if stats else 0.0
    lines += gauge("disagg_kv_cache_usage_perc", "KV cache usage (0-1)", round(used, 6), lab)
    cache_dtype = synced.ready[0].kv_cache_dtype if synced.ready else None
    info_lab = (f'{{block_size="{synced.block_size}",num_gpu_blocks="{synced.num_gpu_blocks}",'
                f'max_model_len="{synced.max_model_len}",'
                f'cache_dtype="{cache_dtype or synced.dtype}"}}')
    lines += gauge("disagg_cache_config_info", "Synced cache configuration", 1, info_lab)
    connector: dict[str, float] = {}
    for s in stats:
        for k, v in s.connector.items():
            connector[k] = connector.get(k, 0.0) + v
    for key, value in sorted(connector.items()):
        lines += gauge(f"disagg_kv_connector_{key}", f"KV connector {key}", value, lab)
    return "\n".join(lines) + "\n"
