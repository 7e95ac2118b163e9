"""The API server's instants of one request, turned into its ``disagg_timings``
(definitions: disagg/common/timings.py). Only this process's monotonic clock is read here; the
engine core's part arrives as durations."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from disagg.common.timings import EngineTimings, InstanceTimings, instance_timings
from disagg.server.metrics import ServerMetrics


@dataclass(slots=True)
class RequestClock:
    """Received -> first engine output -> first token written (or answer ready)."""

    received_s: float = field(default_factory=time.monotonic)
    first_output_s: float | None = None
    engine: EngineTimings | None = None
    timings: InstanceTimings | None = None
    """Set once the request was answered (``answered``)."""

    def on_output(self, timings: EngineTimings | None) -> None:
        """An engine output arrived: the first one's instant, and the engine's durations (sent
        with that first output)."""
        if self.first_output_s is None:
            self.first_output_s = time.monotonic()
        if timings is not None:
            self.engine = timings

    def answered(self, metrics: ServerMetrics) -> InstanceTimings:
        """The first token is being handed to the transport (not streamed: the answer is
        ready): the request's timings, observed in ``metrics`` once."""
        if self.timings is None:
            self.timings = instance_timings(self.received_s, self.first_output_s,
                                            time.monotonic(), self.engine)
            metrics.observe_timings(self.timings)
        return self.timings
