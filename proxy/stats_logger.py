"""The proxy's periodic stats line (off with ``--disable-log-stats``), the instances' in kind:

    Avg request throughput: 41.3 reqs/s, In flight: 12 reqs, Finished: 413 (ok 410, failed 1,
    rejected 2, unavailable 0, client gone 0), Retries: prefill 1, decode 0, Aborts sent: 3

Counts cover the last interval; a line is logged while there is activity and once more when
it stops.
"""

from __future__ import annotations

import time

from proxy.metrics import Outcome, ProxyMetrics
from proxy.registry import Pool


def _by_outcome(metrics: ProxyMetrics) -> dict[str, int]:
    out = dict.fromkeys((o.value for o in Outcome), 0)
    for (_, outcome), n in metrics.requests.items():
        out[outcome] = out.get(outcome, 0) + n
    return out


class ProxyStatsLogger:
    """Makes the line from ProxyMetrics' counters (differences since the last line)."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics
        self._last = self._totals()
        self._was_active = False

    def _totals(self) -> dict[str, float]:
        m = self._metrics
        return {**_by_outcome(m), "at_s": time.monotonic(), "aborts": m.aborts_sent,
                **{f"retries_{p.value}": m.retries[p.value] for p in Pool}}

    def line(self) -> str | None:
        """The line for the interval since the last call (None while idle)."""
        now, last = self._totals(), self._last
        self._last = now
        delta = {k: now[k] - last.get(k, 0) for k in now}
        in_flight = self._metrics.in_flight
        finished = sum(delta[o.value] for o in Outcome)
        active = bool(in_flight or finished or delta["aborts"])
        if not (active or self._was_active):
            return None
        self._was_active = active
        outcomes = ", ".join(f"{o.value.replace('_', ' ')} {delta[o.value]:.0f}" for o in Outcome)
        retries = ", ".join(f"{p.value} {delta[f'retries_{p.value}']:.0f}" for p in Pool)
        return (f"Avg request throughput: {finished / max(delta['at_s'], 1e-9):.1f} reqs/s, "
                f"In flight: {in_flight} reqs, Finished: {finished:.0f} ({outcomes}), "
                f"Retries: {retries}, Aborts sent: {delta['aborts']:.0f}")
