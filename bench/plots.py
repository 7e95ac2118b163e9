"""PNG plots of a sweep: latency percentiles, throughput, TTFT distribution (matplotlib Agg)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_PCT_KEY = re.compile(r"^p([0-9.]+)_(ttft|tpot|itl|e2el)_ms$")
_THROUGHPUTS = (("output_throughput", "output tok/s"),
                ("total_token_throughput", "total tok/s"))


def _x_values(results: list[dict[str, Any]], axis: str) -> list[float]:
    """The sweep variable of each point (an infinite rate is drawn at 0)."""
    key = "max_concurrency" if axis == "concurrency" else "request_rate"
    return [0.0 if r[key] in (None, "inf") else float(r[key]) for r in results]


def _latency_plot(results: list[dict[str, Any]], xs: list[float], axis: str,
                  path: Path) -> Path:
    """One panel per metric, one line per percentile (plus the median)."""
    metrics = [m for m in ("ttft", "tpot", "itl", "e2el") if f"median_{m}_ms" in results[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.plot(xs, [r[f"median_{metric}_ms"] for r in results], marker="o", label="median")
        for key in results[0]:
            m = _PCT_KEY.match(key)
            if m and m.group(2) == metric and m.group(1) != "50":
                ax.plot(xs, [r[key] for r in results], marker="o", label=f"p{m.group(1)}")
        ax.set_title(f"{metric.upper()} (ms)")
        ax.set_xlabel(axis)
        if axis == "concurrency":
            ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _throughput_plot(results: list[dict[str, Any]], xs: list[float], axis: str,
                     path: Path) -> Path:
    """Token throughputs on the left panel, request throughput and goodput on the right."""
    fig, (tokens_ax, requests_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in _THROUGHPUTS:
        tokens_ax.plot(xs, [r[key] for r in results], marker="o", label=label)
    tokens_ax.set_ylabel("tokens/s")
    requests_ax.plot(xs, [r["request_throughput"] for r in results], marker="s",
                     label="requests/s")
    if results[0].get("request_goodput") is not None:
        requests_ax.plot(xs, [r["request_goodput"] for r in results], marker="^",
                         label="goodput requests/s")
    requests_ax.set_ylabel("requests/s")
    for ax in (tokens_ax, requests_ax):
        ax.set_xlabel(axis)
        if axis == "concurrency":
            ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ttft_plot(results: list[dict[str, Any]], xs: list[float], axis: str, path: Path) -> Path:
    """Empirical CDF of the successful requests' TTFT, one curve per point."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for result, x in zip(results, xs, strict=True):
        ttfts_ms = np.sort([t * 1000 for t, e in zip(result["ttfts"], result["errors"],
                                                     strict=True) if not e])
        if len(ttfts_ms):
            ax.step(ttfts_ms, np.arange(1, len(ttfts_ms) + 1) / len(ttfts_ms), where="post",
                    label=f"{axis}={x:g}")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(results: list[dict[str, Any]], axis: str, prefix: Path) -> list[Path]:
    """Write ``<prefix>-latency.png``, ``-throughput.png`` and ``-ttft.png``."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    xs = _x_values(results, axis)
    return [_latency_plot(results, xs, axis, Path(f"{prefix}-latency.png")),
            _throughput_plot(results, xs, axis, Path(f"{prefix}-throughput.png")),
            _ttft_plot(results, xs, axis, Path(f"{prefix}-ttft.png"))]
