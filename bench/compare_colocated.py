"""P/D against colocated: the same workload's results side by side, as ratios and a verdict.

``disagg bench serve --compare-colocated URL`` runs every point against the P/D deployment,
then against URL; this module pairs the two results of each point. Every ratio is P/D over
colocated: above 1 is better for P/D on throughputs, worse on latencies. P/D *loses* a point
when its goodput is below the colocated one's (its request throughput when no ``--goodput``
SLO was given); one WARNING line names every point it loses.
"""

from __future__ import annotations

from typing import Any

from bench.results import rate_label

RATIO_KEYS = (
    ("request_goodput", "Request goodput (req/s)"),
    ("request_throughput", "Request throughput (req/s)"),
    ("output_throughput", "Output token throughput (tok/s)"),
    ("mean_ttft_ms", "Mean TTFT (ms)"),
    ("p99_ttft_ms", "P99 TTFT (ms)"),
    ("mean_itl_ms", "Mean ITL (ms)"),
    ("p99_itl_ms", "P99 ITL (ms)"),
)
"""The figures compared, with their table titles (a missing one, e.g. p99 without 99 in
--metric-percentiles, has no ratio)."""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def ratio(pd: Any, colocated: Any) -> float | None:
    """``pd / colocated``; None when either is missing or colocated is 0."""
    a, b = _number(pd), _number(colocated)
    return a / b if a is not None and b else None


def point_name(result: dict[str, Any], axis: str | None) -> str:
    """``c=64``, ``r=4`` or ``c=8 r=inf`` (a single point names both)."""
    rate = result.get("request_rate")
    rate_text = rate if isinstance(rate, str) else rate_label(float(rate or 0))
    if axis == "concurrency":
        return f"c={result.get('max_concurrency')}"
    if axis == "rate":
        return f"r={rate_text}"
    return f"c={result.get('max_concurrency')} r={rate_text}"


def compare_point(pd: dict[str, Any], colocated: dict[str, Any],
                  axis: str | None) -> dict[str, Any]:
    """Both runs' figures at one point, their ratios, and whether P/D loses it."""
    decided_by = "request_goodput" if pd.get("request_goodput") is not None \
        else "request_throughput"
    keys = [key for key, _ in RATIO_KEYS]
    return {
        "point": point_name(pd, axis),
        "max_concurrency": pd.get("max_concurrency"),
        "request_rate": pd.get("request_rate"),
        "pd": {key: pd.get(key) for key in keys},
        "colocated": {key: colocated.get(key) for key in keys},
        "ratios": {key: ratio(pd.get(key), colocated.get(key)) for key in keys},
        "decided_by": decided_by,
        "pd_loses": (_number(pd.get(decided_by)) or 0.0)
        < (_number(colocated.get(decided_by)) or 0.0),
    }


def loss_warning(points: list[dict[str, Any]], slos_ms: dict[str, float] | None) -> str | None:
    """One WARNING line naming every point P/D loses, or None when it loses none."""
    lost = [p for p in points if p["pd_loses"]]
    if not lost:
        return None
    if slos_ms:
        what = "goodput (" + " ".join(f"{k}<={v:g}ms" for k, v in slos_ms.items()) + ")"
    else:
        what = "request throughput (no --goodput SLO given)"
    key = lost[0]["decided_by"]
    each = ", ".join(f"{p['point']}: {p['ratios'][key]:.2f}x" if p["ratios"][key] is not None
                     else f"{p['point']}: {p['pd'][key] or 0:g} vs {p['colocated'][key]:g}"
                     for p in lost)
    return (f"WARNING: P/D loses to colocated on {what} at {len(lost)} of {len(points)} "
            f"point(s) ({each}; P/D/colocated)")


def _cell(value: float | None, fmt: str) -> str:
    return f"{value:{fmt}}" if value is not None else "n/a"


def format_comparison(points: list[dict[str, Any]], pd_name: str, colocated_name: str,
                      warning: str | None) -> str:
    """The comparison table: one block per point, then the warning if any."""
    lines = [f"{' P/D vs colocated ':=^62}", f"P/D:       {pd_name}",
             f"colocated: {colocated_name}",
             f"{'metric':<34}{'P/D':>10}{'colocated':>10}{'ratio':>8}"]
    for p in points:
        lines.append(f"{'--- ' + p['point'] + ' ':-<62}")
        for key, title in RATIO_KEYS:
            pd_value, colo_value = _number(p["pd"][key]), _number(p["colocated"][key])
            if pd_value is None and colo_value is None:
                continue
            lines.append(f"{title:<34}{_cell(pd_value, '10.2f')}{_cell(colo_value, '10.2f')}"
                         f"{_cell(p['ratios'][key], '8.3f')}")
    lines.append("=" * 62)
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def comparison_row(point: dict[str, Any], pd: dict[str, Any], colocated: dict[str, Any],
                   command: str) -> dict[str, Any]:
    """One JSON-lines row per point (bench/readme_table.py's row contract, ``figures``)."""
    figures = {f"{key} P/D/colocated": value for key, value in point["ratios"].items()
               if value is not None}
    return {
        "kind": "serve-compare", "date": pd.get("date"), "model_id": pd.get("model_id"),
        "hardware": pd.get("hardware"), "commit": pd.get("commit"),
        "versions": pd.get("versions"),
        "deployment": f"{pd.get('deployment') or 'P/D'} vs {colocated.get('deployment')}",
        "workload": f"{pd.get('workload')}; {point['point']}",
        "command": command, "pd_base_url": pd.get("base_url"),
        "colocated_base_url": colocated.get("base_url"),
        "goodput_slos_ms": pd.get("goodput_slos_ms"), "metadata": pd.get("metadata"),
        **point, "figures": figures,
    }


def comparison_result(points: list[dict[str, Any]], pd_rows: list[dict[str, Any]],
                      colocated_rows: list[dict[str, Any]],
                      warning: str | None) -> dict[str, Any]:
    """The comparison JSON: every point's comparison and both runs' summary rows."""
    first = pd_rows[0]
    return {"kind": "serve-compare", "date": first.get("date"), "command": first.get("command"),
            "model_id": first.get("model_id"), "workload": first.get("workload"),
            "pd_base_url": first.get("base_url"),
            "colocated_base_url": colocated_rows[0].get("base_url"),
            "goodput_slos_ms": first.get("goodput_slos_ms"), "warning": warning,
            "points": points, "pd": pd_rows, "colocated": colocated_rows}
