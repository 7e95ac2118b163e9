"""PNG plots of a sweep (matplotlib Agg): latency percentiles, throughput, TTFT distribution,
and the Pareto view of output tok/s per user against tok/s per GPU.

Every figure has a title naming the deployment and workload, and plain tick labels (``12000``,
never ``1.2e4`` or a ``+1e3`` offset). The Pareto view draws one point per sweep point and the
frontier of points no other point beats on both axes; several runs (P/D and colocated) share
it, one series each.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

_PCT_KEY = re.compile(r"^p([0-9.]+)_(ttft|tpot|itl|e2el)_ms$")
_THROUGHPUTS = (("output_throughput", "output tok/s"),
                ("total_token_throughput", "total tok/s"))
_AXIS_LABELS = {"concurrency": "max concurrency (requests)", "rate": "request rate (req/s)"}
PARETO_X = "output tok/s per user (1 / mean TPOT)"
PARETO_Y = "output tok/s per GPU"


def plain_number(value: float, _pos: int | None = None) -> str:
    """A tick label without exponent or offset: ``12000``, ``0.25``."""
    if value == 0:
        return "0"
    return str(np.format_float_positional(value, precision=6, trim="-"))


def _style(ax: Axes, axis: str | None = None) -> None:
    """Log2 x for concurrency, plain tick labels on both axes, a light grid."""
    if axis == "concurrency":
        ax.set_xscale("log", base=2)
    for which in (ax.xaxis, ax.yaxis):
        which.set_major_formatter(FuncFormatter(plain_number))
        which.set_minor_formatter(NullFormatter())
    if axis is not None:
        ax.set_xlabel(_AXIS_LABELS.get(axis, axis))
    ax.grid(True, alpha=0.3)


def sweep_title(results: list[dict[str, Any]]) -> str:
    """``deployment: workload`` of the sweep (what the README row would name)."""
    first = results[0]
    who = first.get("deployment") or first.get("base_url") or "serve"
    return f"{who}: {first.get('workload') or first.get('dataset_name') or ''}".rstrip(": ")


def _x_values(results: list[dict[str, Any]], axis: str) -> list[float]:
    """The sweep variable of each point (an infinite rate is drawn at 0)."""
    key = "max_concurrency" if axis == "concurrency" else "request_rate"
    return [0.0 if r[key] in (None, "inf") else float(r[key]) for r in results]


def latency_figure(results: list[dict[str, Any]], axis: str, title: str) -> Figure:
    """One panel per metric, one line per percentile (plus the median)."""
    xs = _x_values(results, axis)
    metrics = [m for m in ("ttft", "tpot", "itl", "e2el") if f"median_{m}_ms" in results[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.plot(xs, [r[f"median_{metric}_ms"] for r in results], marker="o", label="median")
        for key in results[0]:
            m = _PCT_KEY.match(key)
            if m and m.group(2) == metric and m.group(1) != "50":
                ax.plot(xs, [r[key] for r in results], marker="o", label=f"p{m.group(1)}")
        ax.set_title(f"{metric.upper()}")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        _style(ax, axis)
        ax.legend()
    fig.suptitle(f"Latency vs {axis} - {title}")
    fig.tight_layout()
    return fig


def throughput_figure(results: list[dict[str, Any]], axis: str, title: str) -> Figure:
    """Token throughputs on the left panel, request throughput and goodput on the right."""
    xs = _x_values(results, axis)
    fig, (tokens_ax, requests_ax) = plt.subplots(1, 2, figsize=(10, 4.4))
    for key, label in _THROUGHPUTS:
        tokens_ax.plot(xs, [r[key] for r in results], marker="o", label=label)
    tokens_ax.set_title("Token throughput")
    tokens_ax.set_ylabel("tokens/s")
    requests_ax.plot(xs, [r["request_throughput"] for r in results], marker="s",
                     label="requests/s")
    if results[0].get("request_goodput") is not None:
        requests_ax.plot(xs, [r["request_goodput"] for r in results], marker="^",
                         label="goodput requests/s")
    requests_ax.set_title("Request throughput")
    requests_ax.set_ylabel("requests/s")
    for ax in (tokens_ax, requests_ax):
        _style(ax, axis)
        ax.legend()
    fig.suptitle(f"Throughput vs {axis} - {title}")
    fig.tight_layout()
    return fig


def ttft_figure(results: list[dict[str, Any]], axis: str, title: str) -> Figure:
    """Empirical CDF of the successful requests' TTFT, one curve per point."""
    xs = _x_values(results, axis)
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    for result, x in zip(results, xs, strict=True):
        ttfts_ms = np.sort([t * 1000 for t, e in zip(result["ttfts"], result["errors"],
                                                     strict=True) if not e])
        if len(ttfts_ms):
            ax.step(ttfts_ms, np.arange(1, len(ttfts_ms) + 1) / len(ttfts_ms), where="post",
                    label=f"{axis}={plain_number(x)}")
    _style(ax)
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.legend(fontsize="small")
    ax.set_title(f"TTFT distribution - {title}", fontsize="medium")
    fig.tight_layout()
    return fig


def pareto_point(result: dict[str, Any]) -> tuple[float, float] | None:
    """(tok/s per user, tok/s per GPU) of one point; None without a TPOT."""
    per_user = result.get("output_throughput_per_user")
    if per_user is None and result.get("mean_tpot_ms"):
        per_user = 1000 / result["mean_tpot_ms"]
    if not per_user:
        return None
    per_gpu = result.get("output_throughput_per_gpu")
    if per_gpu is None:
        per_gpu = result["output_throughput"] / (result.get("num_gpus") or 1)
    return float(per_user), float(per_gpu)


def _point_label(result: dict[str, Any], axis: str) -> str:
    """``c=64`` or ``r=4`` (``r=inf``): which sweep point a marker is."""
    if axis == "concurrency":
        return f"c={result.get('max_concurrency')}"
    rate = result.get("request_rate")
    return f"r={rate if isinstance(rate, str) else plain_number(float(rate or 0))}"


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better), by x."""
    frontier, best_y = [], -np.inf
    for i in sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1])):
        if points[i][1] > best_y:
            frontier.append(i)
            best_y = points[i][1]
    return sorted(frontier, key=lambda i: points[i][0])


def pareto_figure(series: dict[str, list[dict[str, Any]]], axis: str, title: str) -> Figure:
    """Each series' points labelled with their sweep value, and its frontier as a line."""
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, results) in enumerate(series.items()):
        kept = [(point, _point_label(r, axis)) for r in results
                if (point := pareto_point(r)) is not None]
        if not kept:
            continue
        color = colors[i % len(colors)]
        points = [point for point, _ in kept]
        ax.scatter(*zip(*points, strict=True), color=color, label=name or None)
        edge = [points[j] for j in pareto_frontier(points)]
        ax.plot(*zip(*edge, strict=True), color=color, alpha=0.6)
        for point, label in kept:
            ax.annotate(label, point, textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small")
    _style(ax)
    ax.set_xlabel(PARETO_X)
    ax.set_ylabel(PARETO_Y)
    if any(series):
        ax.legend()
    ax.set_title(f"Pareto: per-user vs per-GPU speed - {title}", fontsize="medium")
    fig.tight_layout()
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pareto(series: dict[str, list[dict[str, Any]]], axis: str, path: Path,
                title: str) -> Path:
    """Write the Pareto view of several runs (``{"P/D": results, "colocated": results}``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(pareto_figure(series, axis, title), path)


def plot_sweep(results: list[dict[str, Any]], axis: str, prefix: Path) -> list[Path]:
    """Write ``<prefix>-latency.png``, ``-throughput.png``, ``-ttft.png`` and ``-pareto.png``."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    title = sweep_title(results)
    return [_save(latency_figure(results, axis, title), Path(f"{prefix}-latency.png")),
            _save(throughput_figure(results, axis, title), Path(f"{prefix}-throughput.png")),
            _save(ttft_figure(results, axis, title), Path(f"{prefix}-ttft.png")),
            plot_pareto({"": results}, axis, Path(f"{prefix}-pareto.png"), title)]
