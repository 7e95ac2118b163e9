"""Result files: full JSON per run, one summary row per run in a JSON-lines file, comparisons."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from bench.metrics import METRIC_TITLES

THROUGHPUT_KEYS = ("request_throughput", "request_goodput", "output_throughput",
                   "total_token_throughput", "max_output_tokens_per_s")
_LATENCY_KEY = re.compile(r"^(mean|median|std|p[0-9.]+)_(ttft|tpot|itl|e2el)_ms$")
# Per-request lists stay in the full JSON; summary rows are one short line each.
_LIST_KEYS = frozenset({"input_lens", "output_lens", "ttfts", "itls", "latencies",
                        "start_times", "errors"})


class ResultFileError(ValueError):
    """A result file is missing or is not a benchmark result (user-facing message)."""


def write_json(path: Path, result: dict[str, Any]) -> Path:
    """Write one full result (parents created); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its per-request lists: one JSON-lines row."""
    return {key: value for key, value in result.items() if key not in _LIST_KEYS}


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line (file and parents created on first use)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every JSON object in a JSON-lines file; blank and malformed lines are skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_result(path: str) -> dict[str, Any]:
    """A saved result JSON, or ResultFileError naming the problem."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ResultFileError(f"no such result file: {path}") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{path} is not a JSON result file ({exc})") from exc
    if not isinstance(data, dict) or "completed" not in data:
        raise ResultFileError(f"{path} is not a benchmark result (no 'completed' key)")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def compare_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Throughput and latency keys both results carry as numbers, in a stable order."""
    keys = [k for k in THROUGHPUT_KEYS if _is_number(a.get(k)) and _is_number(b.get(k))]
    keys += [k for k in a if _LATENCY_KEY.match(k) and not k.startswith("std_")
             and _is_number(a[k]) and _is_number(b.get(k))]
    return keys


def format_compare(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> str:
    """A table of A, B and B/A for the key metrics (higher is better for throughputs)."""
    lines = [f"A = {name_a}", f"B = {name_b}",
             f"{'metric':<28} {'A':>12} {'B':>12} {'B/A':>8}"]
    for key in compare_keys(a, b):
        ratio = f"{b[key] / a[key]:.3f}" if a[key] else "n/a"
        lines.append(f"{key:<28} {a[key]:>12.2f} {b[key]:>12.2f} {ratio:>8}")
    return "\n".join(lines)


def _line(label: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<40} {text:<10}"


def _optional(value: float | None) -> float | str:
    """A figure the instances may not report (a hit rate with caching off): ``n/a``."""
    return "n/a" if value is None else float(value)


def _latency_lines(result: dict[str, Any], metrics: list[str]) -> list[str]:
    lines = []
    for name in metrics:
        lines.append(f"{METRIC_TITLES[name]:-^50}")
        upper = name.upper()
        for key, value in result.items():
            m = _LATENCY_KEY.match(key)
            if not m or m.group(2) != name or m.group(1) == "std":
                continue
            stat = {"mean": "Mean", "median": "Median"}.get(m.group(1), m.group(1).upper())
            lines.append(_line(f"{stat} {upper} (ms):", value))
    return lines


def format_summary(result: dict[str, Any], metrics: list[str]) -> str:
    """The end-of-run table, laid out like ``vllm bench serve`` prints it."""
    rate = result.get("request_rate")
    lines = [f"{' Serving Benchmark Result ':=^50}",
             _line("Successful requests:", result["completed"]),
             _line("Failed requests:", result["failed"]),
             _line("Maximum request concurrency:", result.get("max_concurrency")),
             _line("Request rate configured (RPS):", rate),
             _line("Benchmark duration (s):", result["duration"]),
             _line("Total input tokens:", result["total_input_tokens"]),
             _line("Total generated tokens:", result["total_output_tokens"]),
             _line("Request throughput (req/s):", result["request_throughput"])]
    if result.get("request_goodput") is not None:
        lines.append(_line("Request goodput (req/s):", result["request_goodput"]))
    lines += [_line("Output token throughput (tok/s):", result["output_throughput"]),
              _line("Peak output token throughput (tok/s):",
                    result.get("max_output_tokens_per_s", 0.0)),
              _line("Peak concurrent requests:", result.get("max_concurrent_requests")),
              _line("Total token throughput (tok/s):", result["total_token_throughput"]),
              _line("Client CPU per request (ms):", result.get("client_cpu_ms_per_request")),
              _line("Client event-loop lag p99 (ms):", result.get("client_loop_lag_p99_ms"))]
    if "prefix_cache_hit_rate" in result:
        lines += [_line("Prefix cache hit rate:", _optional(result["prefix_cache_hit_rate"])),
                  _line("KV bytes moved per request:",
                        _optional(result.get("kv_bytes_moved_per_request")))]
    lines += _latency_lines(result, metrics)
    lines += _phase_lines(result)
    lines += _error_lines(result.get("errors", []))
    lines.append("=" * 50)
    return "\n".join(lines)


def _phase_lines(result: dict[str, Any]) -> list[str]:
    """Mean and percentiles of each TTFT phase the server reported (ms), one line each."""
    names = result.get("phase_names") or []
    if not names:
        return []
    lines = [f"{' TTFT phases (server, ms) ':-^50}",
             f"{'phase':<18} {'mean':>7} {'p50':>7} {'p90':>7} {'p99':>7}"]
    for name in names:
        values = [result.get(f"{stat}_phase_{name}_ms") for stat in ("mean", "p50", "p90", "p99")]
        lines.append(f"{name:<18} " + " ".join(f"{v:>7.2f}" if isinstance(v, float) else
                                                f"{'n/a':>7}" for v in values))
    return lines


def _error_lines(errors: list[str], max_kinds: int = 5) -> list[str]:
    """The most common distinct error strings with their counts."""
    counts: dict[str, int] = {}
    for error in errors:
        if error:
            counts[error] = counts.get(error, 0) + 1
    if not counts:
        return []
    lines = [f"{'Errors':-^50}"]
    for error, count in sorted(counts.items(), key=lambda kv: -kv[1])[:max_kinds]:
        lines.append(f"{count:>6} x {error}")
    return lines


def rate_label(rate: float) -> str:
    """``inf`` or a compact number for file names."""
    return "inf" if math.isinf(rate) else f"{rate:g}"
