"""Result files: JSON, summary rows, the summary table."""

from __future__ import annotations

import json
import math

import pytest

from bench.client import RequestOutput
from bench.metrics import calculate_metrics
from bench.results import (
    append_row,
    compare_keys,
    format_summary,
    read_rows,
    summary_row,
    write_json,
)


def _result() -> dict:
    outs = [RequestOutput(prompt_len=5, success=True, output_tokens=3, ttft_s=0.1,
                          latency_s=0.3, itl_s=[0.1, 0.1]),
            RequestOutput(prompt_len=5, error="HTTP 503: overloaded")]
    result = calculate_metrics(outs, 1.0, ["ttft", "itl"], [50, 99], {"ttft": 500})
    result.update(max_concurrency=2, request_rate="inf")
    return result


def test_summary_table_lists_figures_and_errors():
    text = format_summary(_result(), ["ttft", "itl"])
    assert "Successful requests:" in text and "Failed requests:" in text
    assert "Mean TTFT (ms):" in text and "P99 ITL (ms):" in text
    assert "Request goodput (req/s):" in text
    assert "1 x HTTP 503: overloaded" in text


def test_summary_table_lists_cache_figures_only_when_measured():
    assert "Prefix cache hit rate:" not in format_summary(_result(), ["ttft"])
    result = dict(_result(), prefix_cache_hit_rate=None, kv_bytes_moved_per_request=2048.0)
    text = format_summary(result, ["ttft"])
    assert "Prefix cache hit rate:" in text and "n/a" in text
    assert "KV bytes moved per request:" in text and "2048.00" in text


def test_summary_row_drops_per_request_lists(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    append_row(path, summary_row(_result()))
    append_row(path, {"kind": "other"})
    path.write_text(path.read_text() + "garbage\n\n")
    rows = read_rows(path)
    assert len(rows) == 2 and rows[0]["completed"] == 1 and "itls" not in rows[0]


def test_write_json_refuses_nan(tmp_path):
    write_json(tmp_path / "ok.json", {"a": 1})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}
    with pytest.raises(ValueError):
        write_json(tmp_path / "bad.json", {"a": math.nan})


def test_compare_keys_skip_missing_and_non_numeric():
    a = {"output_throughput": 1.0, "mean_ttft_ms": 2.0, "p99_ttft_ms": 3.0, "label": "x",
         "request_goodput": None}
    b = {"output_throughput": 2.0, "mean_ttft_ms": True}
    assert compare_keys(a, b) == ["output_throughput"]
