"""README table cells of one result row, per benchmark kind (serve, throughput, transfer, ...).

Rows written by this package carry ``kind``, ``workload`` and ``command``; bench/transfer.py and
bench/proxy_overhead.py name the kind ``bench`` and describe the workload in ``config``, so their
cells are rebuilt from it here.
"""

from __future__ import annotations

import json
from typing import Any

from bench.metadata import hardware_summary

_NO_MODEL_KINDS = frozenset({"transfer", "proxy_overhead"})


def kind(row: dict[str, Any]) -> str | None:
    """``kind``, or ``bench`` as the transfer and proxy benchmarks name it."""
    value = row.get("kind") or row.get("bench")
    return str(value) if value else None


def hardware(row: dict[str, Any]) -> str:
    """The hardware line: its summary, or one built from the hardware fields."""
    hw = row.get("hardware")
    if isinstance(hw, dict):
        return str(hw.get("summary") or hardware_summary(hw))
    return str(hw or "?")


def model(row: dict[str, Any]) -> str:
    """The model, ``-`` for benchmarks that run none."""
    return str(row.get("model") or row.get("model_id")
               or ("-" if kind(row) in _NO_MODEL_KINDS else "?"))


def _num(row: dict[str, Any], key: str, fmt: str = ".0f") -> str:
    value = row.get(key)
    return format(value, fmt) if isinstance(value, int | float) else "?"


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:g} {unit}"
    return f"{num_bytes} B"


def _rounded_size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"


def _config(row: dict[str, Any]) -> dict[str, Any]:
    cfg = row.get("config")
    return cfg if isinstance(cfg, dict) else {}


def _serve_figures(row: dict[str, Any]) -> str:
    parts = [f"{_num(row, 'output_throughput')} out tok/s",
             f"{_num(row, 'request_throughput', '.2f')} req/s",
             f"TTFT p50/p99 {_num(row, 'median_ttft_ms', '.1f')}/"
             f"{_num(row, 'p99_ttft_ms', '.1f')} ms",
             f"TPOT p50 {_num(row, 'median_tpot_ms', '.2f')} ms",
             f"ITL p99 {_num(row, 'p99_itl_ms', '.2f')} ms"]
    if row.get("request_goodput") is not None:
        parts.append(f"goodput {_num(row, 'request_goodput', '.2f')} req/s")
    if "prefix_cache_hit_rate" in row:
        rate = row["prefix_cache_hit_rate"]
        parts.append(f"prefix hit rate {rate:.1%}" if isinstance(rate, int | float)
                     else "prefix hit rate n/a")
    if isinstance(row.get("kv_bytes_moved_per_request"), int | float):
        parts.append(f"{_rounded_size(row['kv_bytes_moved_per_request'])} KV moved/request")
    if row.get("failed"):
        parts.append(f"{row['failed']} failed")
    return ", ".join(parts)


def _transfer_figures(row: dict[str, Any]) -> str:
    ceiling = row.get("ceiling")
    text = f"{_num(row, 'gb_per_s', '.2f')} GB/s p50"
    if isinstance(row.get("ratio_to_ceiling"), int | float) and isinstance(ceiling, dict):
        text += (f" = {row['ratio_to_ceiling']:.0%} of {ceiling.get('what', 'the ceiling')} "
                 f"({_num(ceiling, 'gb_per_s', '.1f')} GB/s)")
    return text


def _proxy_figures(row: dict[str, Any]) -> str:
    parts = []
    for r in row.get("results") or []:
        name = f"{r.get('scenario')}{' stream' if r.get('stream') else ''} c{r.get('concurrency')}"
        parts.append(f"{name} +{_num(r, 'added_p50_ms', '.2f')}/"
                     f"{_num(r, 'added_p99_ms', '.2f')} ms")
    return "added p50/p99: " + "; ".join(parts) if parts else "?"


def figures(row: dict[str, Any]) -> str:
    """The key figures of one row, by kind; a ``figures`` object for any other kind."""
    k = kind(row)
    if k == "serve":
        return _serve_figures(row)
    if k == "throughput":
        return (f"{_num(row, 'output_throughput')} out tok/s, "
                f"{_num(row, 'total_token_throughput')} total tok/s")
    if k == "crosscheck":
        return (f"TTFT p50 ratio {_num(row, 'ttft_p50_ratio', '.3f')}, "
                f"out tok/s ratio {_num(row, 'output_throughput_ratio', '.3f')} "
                f"(ours/{row.get('independent_client', '?')})")
    if k == "transfer" and "gb_per_s" in row:
        return _transfer_figures(row)
    if k == "proxy_overhead":
        return _proxy_figures(row)
    extra = row.get("figures")
    if isinstance(extra, dict):
        return ", ".join(f"{name} {v:.3g}" if isinstance(v, float) else f"{name} {v}"
                         for name, v in extra.items())
    return "?"


def _config_workload(row: dict[str, Any]) -> str:
    cfg = _config(row)
    if kind(row) == "transfer" and "num_blocks" in cfg:
        settings = {**(cfg.get("options") or {}), **(row.get("env") or {})}
        opts = " ".join(f"{k}={json.dumps(v) if isinstance(v, dict) else v}"
                        for k, v in settings.items())
        return (f"{cfg.get('transport')} {cfg.get('mode')}, {cfg['num_blocks']} x "
                f"{_size(int(cfg.get('block_bytes', 0)))} blocks "
                f"({cfg.get('layout')}, {cfg.get('device')})" + (f", {opts}" if opts else ""))
    if kind(row) == "proxy_overhead" and cfg:
        return (f"{cfg.get('requests')} requests, concurrency {cfg.get('concurrency')}, "
                f"{cfg.get('stream_tokens')} streamed tokens, {cfg.get('proxy_policy')}")
    return ""


def workload(row: dict[str, Any]) -> str:
    """Deployment, workload and load level."""
    parts = [str(row[k]) for k in ("deployment", "workload") if row.get(k)]
    if not row.get("workload") and _config_workload(row):
        parts.append(_config_workload(row))
    if kind(row) == "serve":
        if row.get("max_concurrency") is not None:
            parts.append(f"concurrency {row['max_concurrency']}")
        if row.get("request_rate") not in (None, "inf"):
            parts.append(f"rate {row['request_rate']}/s")
    return "; ".join(parts) or "?"


def command(row: dict[str, Any]) -> str:
    """The command that produced the row (rebuilt from ``config`` for transfer rows)."""
    if row.get("command"):
        return str(row["command"])
    cfg = _config(row)
    if kind(row) == "transfer":
        flags = " ".join(f"--{key.replace('_', '-')} {cfg[key]}" for key in
                         ("transport", "mode", "num_blocks", "block_bytes", "device")
                         if key in cfg)
        options = " ".join(f"--option '{k}={json.dumps(v) if isinstance(v, dict) else v}'"
                           for k, v in (cfg.get("options") or {}).items())
        return f"disagg bench transfer {flags} {options}".strip()
    if kind(row) == "proxy_overhead":
        return "python -m bench.proxy_overhead"
    return ""
