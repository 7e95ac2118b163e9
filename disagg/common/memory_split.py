"""The text of an engine core's GPU memory split, from its bytes by part: the engine's log line,
the frontend's start-up line and what bench/memory_budget.py reads back are this one format.

Parts (bytes): total (the GPU), budget (--gpu-memory-utilization x total), weights, kv, graphs,
activations, other, and held (what the driver counts for the process, when it says).
"""

from __future__ import annotations

from collections.abc import Mapping

GIB = float(2**30)
_SHOWN = (("weights", "weights"), ("KV", "kv"), ("graphs", "graphs"),
          ("activations", "activations"), ("other", "other"))


def describe_memory(parts: Mapping[str, int]) -> str:
    """``GPU memory budget B GiB (u x T): weights .., KV .., graphs .., activations ..,
    other ..[; the process holds H GiB]`` (GiB, two decimals)."""
    total, budget = parts.get("total", 0), parts.get("budget", 0)
    share = round(budget / total, 4) if total else 0.0
    shown = ", ".join(f"{label} {parts.get(key, 0) / GIB:.2f}" for label, key in _SHOWN)
    held = parts.get("held")
    return (f"GPU memory budget {budget / GIB:.2f} GiB ({share:g} x {total / GIB:.2f}): {shown}"
            + ("" if held is None else f"; the process holds {held / GIB:.2f} GiB"))
