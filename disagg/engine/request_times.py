"""Instants of one request inside the engine core, turned into the durations it reports
(definitions: disagg/common/timings.py). All from ``time.monotonic()`` of this process."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.common.timings import EngineTimings


@dataclass(slots=True)
class RequestTimes:
    """When a request was first scheduled, sampled its first token, and moved its KV."""

    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    kv_posted_s: float | None = None
    """The first one-sided op of its transfer was posted (by this side)."""
    kv_done_s: float | None = None
    """Its transfer reached DONE (a decode: its KV is in place)."""
    reported: bool = False
    """The durations went out with an output (they are sent once)."""

    def report(self, arrival_s: float, now_s: float) -> EngineTimings:
        """The durations up to ``now_s`` (the output that carries them); a request that never
        got as far as a step counts the missing parts as zero."""
        scheduled_s = self.first_scheduled_s if self.first_scheduled_s is not None else now_s
        token_s = self.first_token_s if self.first_token_s is not None else now_s
        self.reported = True
        kv_to_scheduled_s = None
        if self.kv_done_s is not None and self.kv_done_s <= scheduled_s:  # a decode
            kv_to_scheduled_s = scheduled_s - self.kv_done_s
        return EngineTimings(queue_s=max(0.0, scheduled_s - arrival_s),
                             compute_s=max(0.0, token_s - scheduled_s),
                             hold_s=max(0.0, now_s - token_s),
                             kv_transfer_s=self.kv_transfer_s(),
                             kv_to_scheduled_s=kv_to_scheduled_s)

    def kv_transfer_s(self) -> float | None:
        """First post -> done; a prefill whose first token came after the first post (a
        layerwise WRITE posts inside the forward) counts from that token: the part it waits
        for. None when this side posted nothing."""
        if self.kv_posted_s is None or self.kv_done_s is None:
            return None
        start_s = self.kv_posted_s
        if self.first_token_s is not None and self.first_token_s < self.kv_done_s:
            start_s = max(start_s, self.first_token_s)
        return max(0.0, self.kv_done_s - start_s)
