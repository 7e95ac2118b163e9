"""Per-transfer KV histograms (duration, bytes) carried up in the connector's stats dict.

The connector's ``metrics()`` dict already crosses engine core -> API server in every stats
message (``EngineStats.connector``), and the frontend sums it over ranks key by key, so the
histograms ride in it as plain counters under keys only this module writes and reads:

    hist:<histogram>:<mode>:<role>:<i>     transfers in bucket i (not cumulative; i ==
                                           len(buckets) is the +Inf bucket)
    hist:<histogram>:<mode>:<role>:sum     the sum of the observed values

Only buckets that were hit have a key, so a connector that moved nothing adds nothing to the
message. Both processes run this same module, so a bucket index means the same bound on both.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

PREFIX = "hist:"
DURATION = "duration_seconds"
"""Last post -> done, on the side that posts the one-sided ops (as transfer_seconds_sum)."""
BYTES = "bytes"
"""Bytes the transfer moved, on the same side."""
DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                      2.5, 5.0, 10.0, 30.0)
BYTES_BUCKETS = tuple(float(1024 * 4**i) for i in range(13))
"""1 KiB to 16 GiB by powers of 4 (a block of a small model to a long prompt of a big one)."""
BUCKETS = {DURATION: DURATION_BUCKETS_S, BYTES: BYTES_BUCKETS}


class TransferHistogram(NamedTuple):
    """One (histogram, mode, role) series, ready for exposition."""

    name: str
    """``duration_seconds`` or ``bytes``."""
    mode: str
    role: str
    cumulative: list[tuple[float, float]]
    """(upper bound, count of values <= it), the last bound +Inf."""
    total: float


def _add(stats: dict[str, float], key: str, value: float) -> None:
    stats[key] = stats.get(key, 0.0) + value


def _observe(stats: dict[str, float], name: str, series: str, value: float) -> None:
    index = bisect.bisect_left(BUCKETS[name], value)
    _add(stats, f"{PREFIX}{name}:{series}:{index}", 1.0)
    _add(stats, f"{PREFIX}{name}:{series}:sum", value)


def observe_transfer(stats: dict[str, float], *, mode: str, role: str, seconds: float,
                     num_bytes: int) -> None:
    """Count one finished transfer into ``stats`` (the connector's counters dict)."""
    series = f"{mode}:{role}"
    _observe(stats, DURATION, series, seconds)
    _observe(stats, BYTES, series, float(num_bytes))


def is_histogram_key(key: str) -> bool:
    """A key this module owns (not a plain connector counter or gauge)."""
    return key.startswith(PREFIX)


def transfer_histograms(stats: dict[str, float]) -> list[TransferHistogram]:
    """The histograms in a (rank-summed) connector dict; unknown or malformed keys are
    skipped (a newer engine's extra series never break the page)."""
    counts: dict[tuple[str, str, str], list[float]] = {}
    sums: dict[tuple[str, str, str], float] = {}
    for key, value in stats.items():
        parts = key[len(PREFIX):].split(":") if is_histogram_key(key) else []
        if len(parts) != 4 or parts[0] not in BUCKETS:
            continue
        series = (parts[0], parts[1], parts[2])
        bounds = BUCKETS[parts[0]]
        if parts[3] == "sum":
            sums[series] = value
        elif parts[3].isdigit() and int(parts[3]) <= len(bounds):
            counts.setdefault(series, [0.0] * (len(bounds) + 1))[int(parts[3])] += value
    out = []
    for series, per_bucket in sorted(counts.items()):
        running, cumulative = 0.0, []
        for bound, count in zip((*BUCKETS[series[0]], float("inf")), per_bucket, strict=True):
            running += count
            cumulative.append((bound, running))
        out.append(TransferHistogram(*series, cumulative, sums.get(series, 0.0)))
    return out
