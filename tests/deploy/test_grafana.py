"""deploy/grafana/disagg.json: a well-formed dashboard whose every query reads series that an
instance's or the proxy's /metrics page exposes (so no panel stays empty after a rename)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

from metrics_pages import instance_page, proxy_page
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "grafana",
                         "disagg.json")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"(?<![\w:$])(?:vllm:|disagg_|process_|python_)[A-Za-z0-9_:]*")


def _dashboard() -> dict[str, Any]:
    with open(DASHBOARD) as f:
        data: dict[str, Any] = json.load(f)
    return data


def _queries(dash: dict[str, Any]) -> Iterator[str]:
    """Every PromQL expression: panel targets and query variables."""
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            yield var["definition"]


def referenced_metrics(expr: str) -> set[str]:
    """The series names an expression reads (label values in quotes left out)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def _exposed(*pages: str) -> set[str]:
    """Every sample name on the pages."""
    return {s.name for page in pages for f in text_string_to_metric_families(page)
            for s in f.samples}


def test_every_metric_the_dashboard_reads_is_exposed() -> None:
    dash = _dashboard()
    exposed = _exposed(instance_page(), proxy_page())
    referenced: set[str] = set()
    for expr in _queries(dash):
        names = referenced_metrics(expr)
        assert names, expr  # every query reads some series
        referenced |= names
    assert referenced - exposed == set()
    # the panels the dashboard promises
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_"
                 "bucket", "vllm:e2e_request_latency_seconds_bucket",
                 "disagg_proxy_request_phase_seconds_bucket", "disagg_request_phase_seconds_"
                 "bucket", "disagg_kv_transfer_duration_seconds_bucket",
                 "disagg_kv_transfer_bytes_bucket", "disagg_kv_connector_transfers_failed_total",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"):
        assert name in referenced, name


def test_the_dashboard_is_well_formed() -> None:
    dash = _dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["type"] in ("row", "timeseries"), panel["title"]
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            if "histogram_quantile" in target["expr"]:
                assert "_bucket" in target["expr"] and "le" in target["expr"], target["expr"]
    names = {v["name"] for v in dash["templating"]["list"]}
    assert names == {"datasource", "model_name"}


def test_the_metric_name_scanner() -> None:
    expr = ('histogram_quantile(0.5, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket'
            '{model_name=~"$model_name",phase="disagg_x"}[$__rate_interval])))')
    assert referenced_metrics(expr) == {"vllm:e2e_request_latency_seconds_bucket"}
