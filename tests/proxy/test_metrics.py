"""The proxy's /metrics on prometheus_client: every disagg_proxy_* family with its type and
labels, process metrics, the content type, one registry per proxy."""

from __future__ import annotations

from typing import Any

from metrics_pages import proxy_page
from prom_text import families, samples, value
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.metrics import ProxyMetrics

PROXY_FAMILIES = {
    "disagg_proxy_requests": "counter",
    "disagg_proxy_retries": "counter",
    "disagg_proxy_aborts_sent": "counter",
    "disagg_proxy_local_prefill": "counter",
    "disagg_proxy_requests_in_flight": "gauge",
    "disagg_proxy_registration_dropped": "counter",
    "disagg_proxy_time_to_first_byte_seconds": "histogram",
    "disagg_proxy_prefill_seconds": "histogram",
    "disagg_proxy_time_to_first_token_seconds": "histogram",
    "disagg_proxy_request_phase_seconds": "histogram",
    "disagg_proxy_kv_index_hashes": "gauge",
    "disagg_proxy_kv_index_fresh_instances": "gauge",
    "disagg_proxy_kv_index_stale": "counter",
    "disagg_proxy_instance_healthy": "gauge",
    "disagg_proxy_instance_outstanding_requests": "gauge",
    "disagg_proxy_instance_outstanding_tokens": "gauge",
    "disagg_proxy_instance_requests": "counter",
}
"""The parser's family names (a counter's without its _total)."""


def test_every_proxy_family_is_typed_and_keeps_its_names() -> None:
    text = proxy_page()
    types = families(text)
    for name, kind in PROXY_FAMILIES.items():
        assert types.get(name) == kind, name
    assert value(text, "disagg_proxy_requests_total", route="/v1/completions",
                 outcome="ok") == 1
    assert value(text, "disagg_proxy_retries_total", pool="prefill") == 1
    assert value(text, "disagg_proxy_aborts_sent_total") == 1
    assert value(text, "disagg_proxy_kv_index_stale_total", reason="seq_gap") == 1
    assert value(text, "disagg_proxy_request_phase_seconds_count", phase="kv_transfer") == 1
    assert value(text, "disagg_proxy_time_to_first_token_seconds_count") == 1
    pools = {labels["url"]: labels["pool"]
             for labels, _ in samples(text, "disagg_proxy_instance_healthy")}
    assert pools == {"http://p0:8000": "prefill", "http://d0:8000": "decode"}
    assert types["python_info"] == "gauge"


def test_each_proxy_has_its_own_registry() -> None:
    a, b = ProxyMetrics(), ProxyMetrics()  # a second registry: no duplicate error
    a.ttft_s.observe(0.1)
    assert value(a.render([]), "disagg_proxy_time_to_first_token_seconds_count") == 1
    assert value(b.render([]), "disagg_proxy_time_to_first_token_seconds_count") == 0
    assert "disagg_proxy_kv_index_hashes" not in families(b.render([]))  # no KV-aware index


async def test_the_route_serves_the_latest_content_type(fakes: Any, proxies: Any,
                                                        http: Any) -> None:
    d = await fakes(role="kv_consumer")
    proxy = await proxies(prefill_urls=(), decode_urls=(d.url,))
    async with http.get(proxy.url + "/metrics") as resp:
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await resp.text()
    assert value(text, "disagg_proxy_instance_healthy", pool="decode", url=d.url) is not None
