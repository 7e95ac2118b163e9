"""Sweep plots are written as PNG files."""

from __future__ import annotations

from bench.client import RequestOutput
from bench.metrics import calculate_metrics
from bench.plots import plot_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _point(concurrency: int, ttft_s: float) -> dict:
    outs = [RequestOutput(prompt_len=4, success=True, output_tokens=3, ttft_s=ttft_s * k,
                          latency_s=ttft_s * k + 0.2, itl_s=[0.1, 0.1]) for k in (1, 2, 3)]
    outs.append(RequestOutput(error="boom"))
    result = calculate_metrics(outs, 1.0, ["ttft", "tpot", "itl", "e2el"], [50, 90, 99],
                               {"ttft": 100})
    result.update(max_concurrency=concurrency, request_rate="inf")
    return result


def test_concurrency_sweep_plots(tmp_path):
    results = [_point(c, 0.01 * c) for c in (1, 8, 64)]
    paths = plot_sweep(results, "concurrency", tmp_path / "plots" / "s")
    assert [p.name for p in paths] == ["s-latency.png", "s-throughput.png", "s-ttft.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_rate_sweep_plots_with_an_infinite_rate(tmp_path):
    results = [_point(1, 0.01), _point(1, 0.02)]
    results[0]["request_rate"] = 2.0
    paths = plot_sweep(results, "rate", tmp_path / "r")
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)
