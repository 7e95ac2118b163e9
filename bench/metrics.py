"""Serving metrics, defined exactly as ``vllm bench serve`` defines them.

* TTFT: send to the first generated text chunk.
* TPOT: ``(e2el - ttft) / (output_tokens - 1)`` per request, first token excluded; requests
  with a single output token have no TPOT (and count as TPOT 0 against a goodput SLO).
* ITL: every gap between consecutive text chunks, pooled over all requests.
* E2EL: send to the last text chunk.
* Throughputs divide by the benchmark's wall duration; only successful requests count.
* Goodput: successful requests meeting every given SLO (``value <= slo``), per second.
* Per request (vLLM's lists): ``ttfts``, ``itls``, ``latencies`` (E2EL, 0 when failed), and in
  the result (bench/serve.py) ``start_times``, seconds from the point's start.
* Pareto view (not vLLM's): output tok/s per GPU and per user (1 / mean TPOT).
* Phases (not vLLM's): when the server returns ``disagg_timings``, the mean and p50/p90/p99 of
  each of its TTFT phases over the successful requests that carry them, as
  ``mean_phase_<name>_ms``, ``p90_phase_<name>_ms`` (definitions: disagg/common/timings.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bench.client import RequestOutput

METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
PHASE_PERCENTILES = (50.0, 90.0, 99.0)


def parse_metric_names(text: str) -> list[str]:
    """``"ttft,tpot"`` -> ``["ttft", "tpot"]``; unknown names raise ValueError."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown or not names:
        raise ValueError(f"--percentile-metrics takes a comma list of {','.join(METRIC_NAMES)}, "
                         f"got {text!r}")
    return names


def parse_percentiles(text: str) -> list[float]:
    """``"50,90,99"`` -> ``[50.0, 90.0, 99.0]``, each in (0, 100]."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v <= 100 for v in values):
        raise ValueError(f"--metric-percentiles takes numbers in (0, 100] like 50,90,99, "
                         f"got {text!r}")
    return values


def parse_goodput(items: list[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos_ms: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        try:
            slo_ms = float(value)
        except ValueError:
            slo_ms = -1.0
        if not sep or name not in GOODPUT_METRICS or slo_ms < 0:
            raise ValueError(f"--goodput takes NAME:MS pairs with NAME in "
                             f"{'/'.join(GOODPUT_METRICS)} and MS >= 0, got {item!r}")
        slos_ms[name] = slo_ms
    return slos_ms


def percentile_key(p: float) -> str:
    """vLLM's key spelling: 99 -> ``p99``, 99.9 -> ``p99.9``."""
    return f"p{int(p)}" if int(p) == p else f"p{p}"


def _per_request_tpot_s(out: RequestOutput) -> float:
    """TPOT of one request, 0 when it produced a single token (vLLM's convention)."""
    if out.output_tokens <= 1:
        return 0.0
    return (out.latency_s - out.ttft_s) / (out.output_tokens - 1)


def _count_good(good_outputs: list[RequestOutput], slos_ms: dict[str, float]) -> int:
    """Requests whose TTFT, TPOT and E2EL are all within their SLOs (given ones only)."""
    num_good = 0
    for out in good_outputs:
        values_s = {"ttft": out.ttft_s, "tpot": _per_request_tpot_s(out), "e2el": out.latency_s}
        if all(values_s[name] * 1000 <= slo_ms for name, slo_ms in slos_ms.items()):
            num_good += 1
    return num_good


def _stats_ms(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    """mean/median/std/percentiles of one metric in ms; all 0 when there are no values."""
    data = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000
    stats = {
        f"mean_{name}_ms": float(np.mean(data)),
        f"median_{name}_ms": float(np.median(data)),
        f"std_{name}_ms": float(np.std(data)),
    }
    for p in percentiles:
        stats[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(data, p))
    return stats


def phase_stats(outputs: list[RequestOutput]) -> dict[str, Any]:
    """Mean and p50/p90/p99 (ms) of every phase the successful requests' servers reported, in
    the order the server sent them; empty when none did."""
    timed = [out.phases_s for out in outputs if out.success and out.phases_s]
    if not timed:
        return {}
    names = list(dict.fromkeys(name for phases in timed for name in phases))
    stats: dict[str, Any] = {"phase_timed_requests": len(timed), "phase_names": names}
    for name in names:
        data = np.asarray([p[name] for p in timed if name in p], dtype=np.float64) * 1000
        stats[f"mean_phase_{name}_ms"] = float(np.mean(data))
        for p in PHASE_PERCENTILES:
            stats[f"{percentile_key(p)}_phase_{name}_ms"] = float(np.percentile(data, p))
    return stats


def max_concurrent_requests(outputs: list[RequestOutput]) -> int:
    """Most requests that were in flight at the same moment (sent to finished)."""
    events: list[tuple[float, int]] = []
    for out in outputs:
        events.append((out.start_s, 1))
        events.append((max(out.end_s, out.start_s), -1))
    events.sort(key=lambda e: (e[0], e[1]))
    in_flight = peak = 0
    for _, delta in events:
        in_flight += delta
        peak = max(peak, in_flight)
    return peak


def max_output_tokens_per_s(outputs: list[RequestOutput], bench_start_s: float) -> float:
    """Peak text chunks per one-second window (one chunk ~ one token when streaming)."""
    stamps: list[float] = []
    for out in outputs:
        if not out.success:
            continue
        t = out.start_s + out.ttft_s
        stamps.append(t)
        for gap in out.itl_s:
            t += gap
            stamps.append(t)
    if not stamps:
        return 0.0
    buckets = np.floor(np.asarray(stamps) - bench_start_s).astype(np.int64)
    return float(np.bincount(buckets - buckets.min()).max())


def calculate_metrics(outputs: list[RequestOutput], duration_s: float,
                      percentile_metrics: list[str], percentiles: list[float],
                      goodput_slos_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """The result dictionary of one benchmark run, with vLLM's key names."""
    good = [out for out in outputs if out.success]
    duration_s = max(duration_s, 1e-9)
    total_input = sum(out.prompt_len for out in good)
    total_output = sum(out.output_tokens for out in good)
    samples_s: dict[str, list[float]] = {
        "ttft": [out.ttft_s for out in good],
        "tpot": [_per_request_tpot_s(out) for out in good if out.output_tokens > 1],
        "itl": [gap for out in good for gap in out.itl_s],
        "e2el": [out.latency_s for out in good],
    }
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(good),
        "failed": len(outputs) - len(good),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(good) / duration_s,
        "request_goodput": (_count_good(good, goodput_slos_ms) / duration_s
                            if goodput_slos_ms else None),
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    for name in percentile_metrics:
        result.update(_stats_ms(name, samples_s[name], percentiles))
    result.update(phase_stats(good))
    result["input_lens"] = [out.prompt_len for out in outputs]
    result["output_lens"] = [out.output_tokens if out.success else 0 for out in outputs]
    result["ttfts"] = [out.ttft_s for out in outputs]
    result["latencies"] = [out.latency_s for out in outputs]
    result["itls"] = [out.itl_s for out in outputs]
    result["errors"] = [out.error for out in outputs]
    return result


def pareto_figures(outputs: list[RequestOutput], output_throughput: float,
                   num_gpus: int) -> dict[str, Any]:
    """The two axes of the Pareto view: output tok/s per GPU, and per user (1 / the mean TPOT
    of the successful multi-token requests; None without one)."""
    tpots_s = [_per_request_tpot_s(out) for out in outputs
               if out.success and out.output_tokens > 1]
    mean_tpot_s = float(np.mean(tpots_s)) if tpots_s else 0.0
    return {"num_gpus": num_gpus, "output_throughput_per_gpu": output_throughput / num_gpus,
            "output_throughput_per_user": 1 / mean_tpot_s if mean_tpot_s > 0 else None}


def finite_or_str(value: float) -> float | str:
    """JSON has no infinity: vLLM writes an infinite request rate as ``"inf"``."""
    return value if math.isfinite(value) else "inf"
