"""TTFT in phases at the proxy: its own instants, the instances' durations, the tiling
(definitions: disagg/common/timings.py), the ``disagg_timings`` of its answer, the phase
histograms and the sampled lifecycle log line.

The proxy asks every prefill and decode call for ``disagg_timings`` (the histograms need them
whatever the client asked); the decode's object comes back in its answer, or in its stream's
last chunk, which the proxy rewrites: the merged object when the client asked, none otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from disagg.common.sse import SSEDecoder, encode_event, event_data
from disagg.common.timings import (
    PHASES,
    TIMINGS_FIELD,
    InstanceTimings,
    parse_instance_timings,
    timings_dict,
)
from proxy.metrics import ProxyMetrics
from proxy.upstream import Reply

logger = logging.getLogger(__name__)

MARKER = b'"' + TIMINGS_FIELD.encode() + b'"'
"""The field's name as it appears in JSON (never inside a JSON string: quotes are escaped)."""
PREFILL_WAIT_S = 0.5
"""WRITE: how long an answer whose client asked for the timings waits for the prefill's own
answer (it carries P's part); the decode's answer usually comes after it anyway."""


@dataclass(slots=True, eq=False)
class PhaseClock:
    """The proxy's instants of one request (``time.monotonic``). A retried call overwrites
    its instants, so failed attempts count in proxy_queue."""

    received_s: float = field(default_factory=time.monotonic)
    want: bool = False
    """The client asked for ``disagg_timings``."""
    observed: bool = True
    """Its phases go into the histograms (one clock per client request: an n > 1 or batched
    request's other choices are not observed again)."""
    mode: str = "local"
    """``local``, ``read`` or ``write``: how the request was routed."""
    transfer_id: str | None = None
    prefill_sent_s: float | None = None
    prefill_answered_s: float | None = None
    decode_sent_s: float | None = None
    decode_answered_s: float | None = None
    """The decode's whole answer, or its stream's first event."""
    relayed_s: float | None = None
    """The first token handed to the client's transport (not streamed: the answer ready)."""
    first_token_by_proxy: bool = False
    """READ: the proxy streamed the prefill's first token itself (proxy/first_token.py)."""
    prefill_reply: Reply | None = None
    """READ: the prefill's answer (its timings are read from it only when needed)."""
    prefill_task: asyncio.Future[Any] | None = None
    """WRITE: the prefill call, which may still run when the decode answers."""


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def tile(clock: PhaseClock, p: InstanceTimings | None,
         d: InstanceTimings | None) -> dict[str, float | None]:
    """The six phases of one request (seconds; None where an instance sent no timings)."""
    out: dict[str, float | None] = dict.fromkeys(PHASES)
    sent_to_relay = _sub(clock.relayed_s, clock.decode_sent_s)
    first_token = None if d is None or sent_to_relay is None else sent_to_relay - d.queue_s
    if clock.mode == "read":
        before = _sub(clock.prefill_sent_s, clock.received_s)
        between = _sub(clock.decode_sent_s, clock.prefill_answered_s)
        out["proxy_queue"] = None if before is None or between is None else before + between
        round_trip = _sub(clock.prefill_answered_s, clock.prefill_sent_s)
        if p is not None and round_trip is not None:
            out["prefill_compute"] = compute_s = p.compute_s + p.output_s
            out["prefill_queue"] = round_trip - compute_s
        if clock.first_token_by_proxy:  # the decode is not on the way to the first token
            out["proxy_queue"] = before
            out["kv_transfer"] = out["decode_admission"] = 0.0
            out["first_token"] = _sub(clock.relayed_s, clock.prefill_answered_s)
            return out
        if d is not None:
            out["kv_transfer"] = kv_s = d.kv_transfer_s or 0.0
            out["decode_admission"] = d.queue_s - kv_s
        out["first_token"] = first_token
        return out
    out["proxy_queue"] = _sub(clock.decode_sent_s, clock.received_s)
    if clock.mode == "write":
        early = d is not None and d.kv_to_scheduled_s is None  # first token before the KV
        if p is not None:
            out["prefill_compute"] = p.compute_s
            out["kv_transfer"] = 0.0 if early else p.kv_transfer_s or 0.0
        if d is not None:
            out["decode_admission"] = 0.0 if early else d.kv_to_scheduled_s
        if p is not None and d is not None and early:
            out["prefill_queue"] = max(0.0, d.queue_s - p.compute_s)
        if p is not None and d is not None and d.kv_to_scheduled_s is not None:
            rest_s = p.compute_s + (p.kv_transfer_s or 0.0) + d.kv_to_scheduled_s
            out["prefill_queue"] = max(0.0, d.queue_s - rest_s)
        out["first_token"] = first_token
        return out
    if d is not None and first_token is not None:  # local: the decode prefilled itself
        out["prefill_queue"], out["prefill_compute"] = d.queue_s, d.compute_s
        out["kv_transfer"] = out["decode_admission"] = 0.0
        out["first_token"] = first_token - d.compute_s
    return out


def timings_object(clock: PhaseClock, p: InstanceTimings | None,
                   d: InstanceTimings | None) -> dict[str, Any]:
    """The proxy's ``disagg_timings``: mode, ttft_s, the phases, and both instances' own."""
    obj: dict[str, Any] = {"mode": clock.mode,
                           "ttft_s": _sub(clock.relayed_s, clock.received_s)}
    obj.update({f"{name}_s": value for name, value in tile(clock, p, d).items()})
    obj["prefill"] = timings_dict(p) if p is not None else None
    obj["decode"] = timings_dict(d) if d is not None else None
    return obj


def _reply_timings(reply: Reply | None) -> InstanceTimings | None:
    if reply is None or MARKER not in reply.body:
        return None
    data = reply.json_object()
    return parse_instance_timings(data.get(TIMINGS_FIELD)) if data is not None else None


def _finished_prefill(clock: PhaseClock) -> InstanceTimings | None:
    """P's timings if its answer is in hand (READ, or a WRITE prefill call that ended)."""
    task = clock.prefill_task
    if task is not None and task.done() and not task.cancelled() and task.exception() is None:
        result = task.result()
        return _reply_timings(result if isinstance(result, Reply) else None)
    return _reply_timings(clock.prefill_reply)


async def _prefill_timings(clock: PhaseClock) -> InstanceTimings | None:
    """P's timings; a WRITE prefill still running is waited for (bounded) when the client
    asked for the timings, else left out (its phases are None)."""
    task = clock.prefill_task
    if task is not None and not task.done() and clock.want:
        await asyncio.wait({task}, timeout=PREFILL_WAIT_S)
    return _finished_prefill(clock)


@dataclass(frozen=True, slots=True)
class PhaseReporter:
    """Observes each answered request's phases and logs a sample of them."""

    metrics: ProxyMetrics
    log_sample_rate: float = 0.0
    """Fraction of requests whose phases get an INFO line (--log-request-phases-sample-rate)."""

    def report(self, clock: PhaseClock, p: InstanceTimings | None, d: InstanceTimings | None,
               response_id: str | None) -> dict[str, Any]:
        """The merged object, observed in the histograms, maybe logged."""
        obj = timings_object(clock, p, d)
        if clock.observed:
            self.metrics.observe_phases(obj["ttft_s"], {n: obj[f"{n}_s"] for n in PHASES})
        if self.log_sample_rate > 0 and random.random() < self.log_sample_rate:
            logger.info("%s", log_line(obj, response_id, clock.transfer_id))
        return obj

    async def answer_body(self, clock: PhaseClock, body: bytes) -> bytes:
        """A decode's non-streamed answer for the client: ``kv_transfer_params`` dropped
        (internal addresses), the decode's timings replaced by the merged ones, when asked."""
        clock.relayed_s = time.monotonic()
        data: Any = None
        if clock.want or MARKER in body or b'"kv_transfer_params"' in body:
            try:
                data = msgspec.json.decode(body)
            except (msgspec.DecodeError, RecursionError):
                data = None
        if not isinstance(data, dict):
            self.report(clock, _finished_prefill(clock), None, None)
            return body
        data.pop("kv_transfer_params", None)
        d = parse_instance_timings(data.pop(TIMINGS_FIELD, None))
        obj = self.report(clock, await _prefill_timings(clock), d, data.get("id"))
        if clock.want:
            data[TIMINGS_FIELD] = obj
        return msgspec.json.encode(data)

    def stream(self, clock: PhaseClock) -> StreamTimings:
        """The rewriter of one relayed stream."""
        return StreamTimings(self, clock)


class StreamTimings:
    """Finds the event that carries the decode's timings (its stream's last chunk) and puts the
    merged object there instead (or nothing, when the client did not ask)."""

    def __init__(self, reporter: PhaseReporter, clock: PhaseClock) -> None:
        self._reporter = reporter
        self._clock = clock
        self._reported = False

    def relaying(self) -> None:
        """The decode's first event is about to go to the client (the first token, unless
        the proxy streamed it already)."""
        if not self._clock.first_token_by_proxy:
            self._clock.relayed_s = time.monotonic()

    async def events(self, events: list[bytes]) -> list[bytes]:
        """``events`` with the timings event rewritten."""
        if self._reported:
            return events
        return [await self._event(e) if MARKER in e else e for e in events]

    async def joined(self, data: bytes) -> bytes:
        """The same for whole events joined in one buffer (the stream's first events)."""
        if self._reported or MARKER not in data:
            return data
        return b"".join(await self.events(SSEDecoder().feed(data)))

    async def _event(self, event: bytes) -> bytes:
        payload = event_data(event)
        try:
            data = msgspec.json.decode(payload) if payload is not None else None
        except (msgspec.DecodeError, RecursionError):
            return event
        if not isinstance(data, dict) or TIMINGS_FIELD not in data:
            return event
        d = parse_instance_timings(data.pop(TIMINGS_FIELD))
        self._reported = True
        clock = self._clock
        obj = self._reporter.report(clock, await _prefill_timings(clock), d, data.get("id"))
        if clock.want:
            data[TIMINGS_FIELD] = obj
        return encode_event(data)

    def close(self) -> None:
        """The stream ended: a request whose decode sent no timings is still observed."""
        if not self._reported and self._clock.relayed_s is not None:
            self._reported = True
            self._reporter.report(self._clock, _finished_prefill(self._clock), None, None)


def log_line(obj: dict[str, Any], response_id: str | None, transfer_id: str | None) -> str:
    """One request's lifecycle line: ids, mode, TTFT and each phase in ms."""
    def ms(value: Any) -> str:
        return "-" if value is None else f"{value * 1000:.2f}"

    phases = " ".join(f"{name}_ms={ms(obj[f'{name}_s'])}" for name in PHASES)
    return (f"request phases id={response_id or '-'} transfer_id={transfer_id or '-'} "
            f"mode={obj['mode']} ttft_ms={ms(obj['ttft_s'])} {phases}")
