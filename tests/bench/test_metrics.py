"""Metric math on known timings: TTFT/TPOT/ITL/E2EL definitions, goodput, vLLM key names."""

from __future__ import annotations

import numpy as np
import pytest

from bench.client import RequestOutput
from bench.metrics import (
    calculate_metrics,
    max_concurrent_requests,
    max_output_tokens_per_s,
    parse_goodput,
    parse_metric_names,
    parse_percentiles,
    percentile_key,
)

ALL = ["ttft", "tpot", "itl", "e2el"]


def _ok(ttft_s: float, itls_s: list[float], prompt_len: int = 10, start_s: float = 0.0,
        output_tokens: int | None = None) -> RequestOutput:
    latency_s = ttft_s + sum(itls_s)
    return RequestOutput(prompt_len=prompt_len, success=True,
                         output_tokens=len(itls_s) + 1 if output_tokens is None
                         else output_tokens,
                         ttft_s=ttft_s, latency_s=latency_s, itl_s=list(itls_s),
                         start_s=start_s, end_s=start_s + latency_s)


def test_ttft_tpot_itl_e2el_follow_vllm_definitions():
    a = _ok(0.100, [0.010, 0.020, 0.030])          # 4 tokens, e2el 0.16
    b = _ok(0.200, [0.050], prompt_len=30)          # 2 tokens, e2el 0.25
    m = calculate_metrics([a, b], 2.0, ALL, [50, 99])
    assert m["completed"] == 2 and m["failed"] == 0
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    # TPOT excludes the first token: (e2el - ttft) / (n - 1)
    tpots_ms = [(0.16 - 0.1) / 3 * 1000, 0.05 * 1000]
    assert m["mean_tpot_ms"] == pytest.approx(np.mean(tpots_ms))
    assert m["median_tpot_ms"] == pytest.approx(np.median(tpots_ms))
    # ITL pools every gap of every request
    itls_ms = [10.0, 20.0, 30.0, 50.0]
    assert m["mean_itl_ms"] == pytest.approx(np.mean(itls_ms))
    assert m["std_itl_ms"] == pytest.approx(np.std(itls_ms))
    assert m["p99_itl_ms"] == pytest.approx(np.percentile(itls_ms, 99))
    assert m["p50_e2el_ms"] == pytest.approx(np.percentile([160.0, 250.0], 50))
    assert m["total_input_tokens"] == 40 and m["total_output_tokens"] == 6
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(23.0)
    assert m["request_goodput"] is None


def test_single_token_requests_have_no_tpot_but_count_for_goodput():
    one = _ok(0.05, [])
    many = _ok(0.05, [0.2, 0.2])
    m = calculate_metrics([one, many], 1.0, ALL, [99], goodput_slos_ms={"tpot": 100})
    assert m["mean_tpot_ms"] == pytest.approx(200.0)  # only the multi-token request
    assert m["request_goodput"] == pytest.approx(1.0)  # the single-token one is good (TPOT 0)


def test_goodput_needs_every_given_slo():
    fast = _ok(0.05, [0.01] * 9)
    slow_first = _ok(0.50, [0.01] * 9)
    slow_decode = _ok(0.05, [0.10] * 9)
    outs = [fast, slow_first, slow_decode]
    assert calculate_metrics(outs, 1.0, ALL, [99], {"ttft": 100})["request_goodput"] == 2
    assert calculate_metrics(outs, 1.0, ALL, [99], {"ttft": 100, "tpot": 20})[
        "request_goodput"] == 1
    assert calculate_metrics(outs, 2.0, ALL, [99], {"e2el": 1000})["request_goodput"] == 1.5


def test_failed_requests_are_recorded_not_counted():
    good = _ok(0.1, [0.1])
    bad = RequestOutput(prompt_len=7, error="HTTP 500: boom")
    m = calculate_metrics([good, bad], 1.0, ALL, [99])
    assert m["completed"] == 1 and m["failed"] == 1
    assert m["input_lens"] == [10, 7] and m["output_lens"] == [2, 0]
    assert m["errors"] == ["", "HTTP 500: boom"]
    assert m["total_input_tokens"] == 10


def test_no_successful_request_gives_zeros_not_nan():
    m = calculate_metrics([RequestOutput(error="x")], 1.0, ALL, [99])
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0 and m["p99_itl_ms"] == 0.0


def test_result_keys_match_vllm_bench_serve():
    m = calculate_metrics([_ok(0.1, [0.1])], 1.0, ALL, [50, 90, 99, 99.9], {"ttft": 1})
    for key in ("duration", "completed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls",
                "errors", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms",
                "p99.9_itl_ms", "p90_tpot_ms", "mean_e2el_ms", "p50_e2el_ms"):
        assert key in m, key


def test_percentile_key_spelling():
    assert percentile_key(99) == "p99" and percentile_key(99.0) == "p99"
    assert percentile_key(99.9) == "p99.9"


def test_option_parsers_accept_good_and_reject_bad_values():
    assert parse_goodput(["ttft:500", "tpot:50.5"]) == {"ttft": 500.0, "tpot": 50.5}
    assert parse_percentiles("50,90,99") == [50.0, 90.0, 99.0]
    assert parse_metric_names("ttft, e2el") == ["ttft", "e2el"]
    for bad in (["ttft"], ["itl:5"], ["ttft:-1"], ["ttft:abc"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)
    with pytest.raises(ValueError, match="--metric-percentiles"):
        parse_percentiles("0,101")
    with pytest.raises(ValueError, match="--percentile-metrics"):
        parse_metric_names("ttft,latency")


def test_max_concurrent_requests_counts_overlap():
    outs = [_ok(0.1, [0.9], start_s=0.0),   # [0, 1.0]
            _ok(0.1, [0.9], start_s=0.5),   # [0.5, 1.5]
            _ok(0.1, [0.9], start_s=1.2)]   # [1.2, 2.2]
    assert max_concurrent_requests(outs) == 2


def test_peak_output_tokens_per_second_window():
    outs = [_ok(0.1, [0.1] * 4, start_s=0.0), _ok(0.1, [0.1] * 4, start_s=0.0)]
    assert max_output_tokens_per_s(outs, 0.0) == 10.0  # all 10 chunks within the first second


def test_phase_stats_over_requests_that_carry_them():
    outs = [_ok(0.1, [0.01]) for _ in range(5)]
    for i, out in enumerate(outs[:4]):  # the fifth server answer had none
        out.phases_s = {"ttft": 0.01 * (i + 1), "kv_transfer": 0.002}
    failed = RequestOutput(success=False, phases_s={"ttft": 9.0, "kv_transfer": 9.0})
    m = calculate_metrics([*outs, failed], 1.0, ALL, [99])
    assert m["phase_timed_requests"] == 4 and m["phase_names"] == ["ttft", "kv_transfer"]
    assert m["mean_phase_ttft_ms"] == pytest.approx(25.0)
    assert m["p50_phase_ttft_ms"] == pytest.approx(25.0)
    assert m["p90_phase_ttft_ms"] == pytest.approx(np.percentile([10, 20, 30, 40], 90))
    assert m["p99_phase_kv_transfer_ms"] == pytest.approx(2.0)
    assert "mean_ttft_ms" in m and m["mean_ttft_ms"] == pytest.approx(100.0)  # the client's
    assert "phase_timed_requests" not in calculate_metrics(outs[4:], 1.0, ALL, [99])
