"""Sweep plots: PNG files, titles and axis labels, plain tick labels, the Pareto view."""

from __future__ import annotations

import sys

import pytest
from matplotlib.figure import Figure

from bench.client import RequestOutput
from bench.metrics import calculate_metrics, pareto_figures
from bench.plots import (
    PARETO_X,
    PARETO_Y,
    latency_figure,
    pareto_figure,
    pareto_frontier,
    plain_number,
    plot_pareto,
    plot_sweep,
    throughput_figure,
    ttft_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _point(concurrency: int, ttft_s: float, scale: float = 1.0) -> dict:
    outs = [RequestOutput(prompt_len=4, success=True, output_tokens=3, ttft_s=ttft_s * k,
                          latency_s=ttft_s * k + 0.2 / concurrency, itl_s=[0.1, 0.1])
            for k in (1, 2, 3)]
    outs.append(RequestOutput(error="boom"))
    result = calculate_metrics(outs, 1.0 / (concurrency * scale),
                               ["ttft", "tpot", "itl", "e2el"], [50, 90, 99], {"ttft": 100})
    result.update(pareto_figures(outs, result["output_throughput"], 2))
    result.update(max_concurrency=concurrency, request_rate="inf", deployment="1P1D tcp read",
                  workload="random in=32 out=3")
    return result


def test_concurrency_sweep_plots(tmp_path):
    results = [_point(c, 0.01 * c) for c in (1, 8, 64)]
    paths = plot_sweep(results, "concurrency", tmp_path / "plots" / "s")
    assert [p.name for p in paths] == ["s-latency.png", "s-throughput.png", "s-ttft.png",
                                       "s-pareto.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_rate_sweep_plots_with_an_infinite_rate(tmp_path):
    results = [_point(1, 0.01), _point(1, 0.02)]
    results[0]["request_rate"] = 2.0
    paths = plot_sweep(results, "rate", tmp_path / "r")
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def _tick_texts(fig: Figure) -> list[str]:
    fig.canvas.draw()
    texts = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            texts += [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
            assert axis.get_offset_text().get_text() == "", "an offset like +1e4 is shown"
    return texts


@pytest.mark.parametrize("make", [latency_figure, throughput_figure, ttft_figure])
def test_every_figure_is_titled_labelled_and_has_plain_ticks(make):
    # big, close-together figures: matplotlib's default would show 1e6 and an offset
    results = [_point(c, 10.0 + 0.001 * c, scale=2e4) for c in (1, 2, 4, 1024)]
    fig = make(results, "concurrency", "1P1D tcp read: random in=32 out=3")
    title = fig.get_suptitle() or fig.axes[0].get_title()
    assert "1P1D tcp read: random in=32 out=3" in title
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    texts = _tick_texts(fig)
    assert texts and not [t for t in texts if "e" in t.lower() or "\N{MINUS SIGN}" in t]
    if make is latency_figure:
        assert "1024" in [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert fig.axes[0].get_xlabel() == "max concurrency (requests)"


def test_pareto_view_of_two_runs_is_titled_labelled_and_plain(tmp_path):
    pd = [_point(c, 0.01 * c, scale=3e4) for c in (1, 8, 64)]
    colocated = [_point(c, 0.02 * c, scale=2e4) for c in (1, 8, 64)]
    fig = pareto_figure({"P/D": pd, "colocated": colocated}, "concurrency", "P/D vs colocated")
    ax = fig.axes[0]
    assert "Pareto" in ax.get_title() and "P/D vs colocated" in ax.get_title()
    assert (ax.get_xlabel(), ax.get_ylabel()) == (PARETO_X, PARETO_Y)
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["P/D", "colocated"]
    assert {t.get_text() for t in ax.texts} == {"c=1", "c=8", "c=64"}
    assert not [t for t in _tick_texts(fig) if "e" in t.lower()]
    path = plot_pareto({"P/D": pd, "colocated": colocated}, "concurrency",
                       tmp_path / "x" / "p.png", "t")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_per_gpu_and_per_user_figures():
    (result,) = [_point(1, 0.01)]
    # 3 requests x 3 tokens in 1 s over 2 GPUs; TPOT = (e2el - ttft) / 2 = 0.1 s each
    assert result["output_throughput_per_gpu"] == pytest.approx(9 / 2)
    assert result["output_throughput_per_user"] == pytest.approx(10.0)


def test_pareto_frontier_keeps_the_points_nothing_beats():
    points = [(10.0, 100.0), (20.0, 80.0), (15.0, 70.0), (30.0, 20.0), (5.0, 90.0)]
    assert pareto_frontier(points) == [0, 1, 3]  # by x; (15, 70) and (5, 90) are beaten


def test_plain_number():
    assert [plain_number(v) for v in (0.0, 1024.0, 1.5e6, 0.25, 1e-4, -3.0)] == \
        ["0", "1024", "1500000", "0.25", "0.0001", "-3"]


def test_serve_skips_plots_with_one_line_without_matplotlib(monkeypatch, tmp_path, capsys):
    from argparse import Namespace

    from bench import serve

    monkeypatch.setitem(sys.modules, "bench.plots", None)  # import raises ImportError
    serve._plot(Namespace(result_filename=None, result_dir=str(tmp_path)), "rate",
                {"": [_point(1, 0.01)]})
    captured = capsys.readouterr()
    assert captured.err == "warning: matplotlib is not installed; no plots\n"
    assert not list(tmp_path.iterdir())
