"""An instance's /metrics on prometheus_client: the vLLM series (model_name label, right
type) next to every disagg_* series the tests, bench and deploy scripts read; escaping; one
registry per app; the engine's state read at scrape time."""

from __future__ import annotations

from typing import Any

from metrics_pages import engine_stats, fake_engine
from prom_text import families, samples, value
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from disagg.server.api_server import ENGINE
from disagg.server.metrics import ServerMetrics
from disagg.server.metrics_render import render_instance_metrics

MODEL = "builtin:tiny-llama"
VLLM_SERIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:prompt_tokens": "counter",  # the parser's family names drop a counter's _total
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
}
DISAGG_SAMPLES = (
    "disagg_request_success_total", "disagg_prompt_tokens_total",
    "disagg_generation_tokens_total", *(f"disagg_{h}_{s}" for h in (
        "time_to_first_token_seconds", "time_per_output_token_seconds",
        "e2e_request_latency_seconds", "request_phase_seconds")
        for s in ("bucket", "sum", "count")),
    "disagg_num_requests_running", "disagg_num_requests_waiting", "disagg_kv_blocks_total",
    "disagg_kv_blocks_free", "disagg_kv_blocks_held", "disagg_kv_blocks_cached",
    "disagg_prefix_cache_queries", "disagg_prefix_cache_hits", "disagg_kv_cache_usage_perc",
    "disagg_cache_config_info", "disagg_kv_connector_bytes_moved_total",
    "disagg_kv_connector_transfers_done_total", "disagg_kv_connector_transfers_active",
    "disagg_kv_connector_transfer_seconds_sum", "disagg_kv_connector_transfer_seconds_count")
"""Every disagg_* sample the hand-written page had (with a connector), under the same name."""


async def test_instance_page_has_the_vllm_series_with_model_name(instance_client: Any) -> None:
    client = await instance_client()
    for stream in (False, True):
        resp = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3,
                                                          "stream": stream})
        assert resp.status == 200
        await resp.read()
    client.app[ENGINE].stats = {0: engine_stats()}
    resp = await client.get("/metrics")
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    text = await resp.text()
    types = families(text)
    for name, kind in VLLM_SERIES.items():
        assert types.get(name) == kind, name
        assert samples(text, name if kind != "counter" else f"{name}_total",
                       model_name=MODEL) or samples(text, f"{name}_count", model_name=MODEL), \
            name
    assert value(text, "vllm:request_success_total", finished_reason="length") == 2
    assert value(text, "vllm:time_to_first_token_seconds_count", model_name=MODEL) == 2
    assert value(text, "vllm:request_queue_time_seconds_count") == 2
    assert value(text, "vllm:prompt_tokens_total") == value(text, "disagg_prompt_tokens_total")
    assert value(text, "vllm:generation_tokens_total") == 6
    assert value(text, "vllm:num_requests_running", model_name=MODEL) == 2
    assert value(text, "vllm:kv_cache_usage_perc") == 0.25  # 16 of 64 blocks in use
    assert value(text, "vllm:prefix_cache_hits_total") == 30
    info = samples(text, "vllm:cache_config_info", model_name=MODEL)
    assert info and info[0][0]["block_size"] == "16" and info[0][0]["num_gpu_blocks"] == "64"
    for name in DISAGG_SAMPLES:
        assert samples(text, name), name
    assert types["disagg_kv_connector_transfers_failed"] == "counter"
    assert types["disagg_kv_connector_transfers_active"] == "gauge"
    assert types["disagg_kv_connector_transfer_seconds"] == "summary"
    assert types["python_info"] == "gauge"  # process and platform collectors on the page


def test_transfer_histograms_by_mode_and_role_summed_over_ranks() -> None:
    engine = fake_engine({0: engine_stats(), 1: engine_stats()})
    text = render_instance_metrics(engine, ServerMetrics("m"), "m")
    types = families(text)
    assert types["disagg_kv_transfer_duration_seconds"] == "histogram"
    assert types["disagg_kv_transfer_bytes"] == "histogram"
    labels = {"mode": "read", "role": "consumer", "model_name": "m"}
    assert value(text, "disagg_kv_transfer_duration_seconds_count", **labels) == 4
    assert value(text, "disagg_kv_transfer_duration_seconds_sum", **labels) == 0.06
    assert value(text, "disagg_kv_transfer_duration_seconds_bucket", le="0.01", **labels) == 2
    assert value(text, "disagg_kv_transfer_bytes_bucket", le="1.048576e+06", **labels) == 2
    assert value(text, "disagg_kv_transfer_bytes_bucket", le="+Inf", **labels) == 4
    assert value(text, "disagg_kv_transfer_bytes_sum", **labels) == 6 * 2**20
    assert not any(n.startswith("disagg_kv_connector_hist") for n in types)
    # the summed connector counters keep their names
    assert value(text, "disagg_kv_connector_bytes_moved_total") == 6 * 2**20


def test_no_connector_and_no_stats_yet() -> None:
    text = render_instance_metrics(fake_engine({}), ServerMetrics("m"), "m")
    types = families(text)
    assert types["disagg_kv_transfer_duration_seconds"] == "histogram"  # the family, no series
    assert not samples(text, "disagg_kv_transfer_duration_seconds_count")
    assert value(text, "disagg_kv_blocks_free") == 64
    assert value(text, "vllm:kv_cache_usage_perc") == 0
    assert value(text, "disagg_request_success_total", finished_reason="stop") == 0


def test_label_values_are_escaped() -> None:
    model = 'a "quoted"\\name\nwith a newline'
    m = ServerMetrics(model)
    m.finished("stop")
    text = render_instance_metrics(fake_engine({0: engine_stats()}), m, model)
    list(text_string_to_metric_families(text))  # parses
    assert value(text, "vllm:request_success_total", model_name=model, finished_reason="stop") == 1
    assert value(text, "vllm:num_requests_running", model_name=model) == 2


def test_each_app_has_its_own_registry() -> None:
    a, b = ServerMetrics("m"), ServerMetrics("m")  # a second registry: no duplicate error
    a.first_token(0.05)
    a.next_output(0.004)
    a.tokens(prompt=7, generated=10)
    a.completed(start_s=0.0, first_s=0.05, end_s=0.5, num_output_tokens=10)
    engine = fake_engine({})
    text_a, text_b = (render_instance_metrics(engine, m, "m") for m in (a, b))
    assert value(text_a, "vllm:inter_token_latency_seconds_bucket", le="0.005") == 1
    assert value(text_a, "vllm:time_per_output_token_seconds_count") == 1
    assert value(text_a, "disagg_time_per_output_token_seconds_sum") == 0.05
    assert value(text_a, "vllm:request_decode_time_seconds_sum") == 0.45
    assert value(text_a, "disagg_prompt_tokens_total") == 7
    assert value(text_b, "disagg_prompt_tokens_total") == 0
    assert value(text_b, "vllm:time_to_first_token_seconds_count") == 0
