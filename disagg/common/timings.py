"""Per-request phase timings: what each process measures, and how the proxy tiles TTFT with it.

Clocks: every instant is ``time.monotonic()`` of the process that takes it, and only durations
cross a process boundary (engine core -> API server -> proxy): no two processes' clocks are
ever compared, so the figures hold across hosts too.

Engine core (``EngineTimings``, sent with a request's first output):
    queue_s        engine arrival -> first scheduled (a decode's wait for remote KV included)
    compute_s      first scheduled -> first token sampled (the end of that step)
    hold_s         first token sampled -> the output sent (a WRITE prefill: its transfer)
    kv_transfer_s  only on the side that posts the one-sided ops (READ: decode, WRITE:
                   prefill): from the first post, or from the first token sampled when that is
                   later (a layerwise WRITE posts during the prefill: only the tail the request
                   waits for counts), to the transfer's DONE (READ: the producer's release ack
                   included); None elsewhere, and when nothing moved
    kv_to_scheduled_s  a decode whose KV came from a prefill: its transfer's DONE (READ: read
                   and vouched for; WRITE: write_done received) -> first scheduled

Instance (``InstanceTimings``, the ``disagg_timings`` object of an instance's answer):
    queue_s        HTTP request received -> first scheduled (parsing, tokenizing and the IPC to
                   and from the engine core included)
    compute_s      first scheduled -> first token sampled
    output_s       first token sampled -> first token handed to the HTTP transport (stream),
                   or the whole answer ready (not streamed)
    total_s        received -> that moment; always queue_s + compute_s + output_s
    kv_transfer_s  the engine's; it lies inside queue_s (READ decode) or output_s (WRITE
                   prefill, whose answer waits for its transfer)
    kv_to_scheduled_s  the engine's; the end of queue_s on a decode

Proxy (the ``disagg_timings`` object of the proxy's answer): ``ttft_s`` = client request
received -> first token handed to the client's transport (not streamed: the answer ready), and
six phases that tile it. R_P and R_D are the proxy's round trips of the prefill call and of the
decode call (sent -> answer, or first SSE event); P and D the instances' objects:

    READ   proxy_queue       received -> prefill sent, plus prefill answered -> decode sent
                             (retries of failed attempts included)
           prefill_queue     R_P - prefill_compute: P's queue_s plus the call's HTTP transit
           prefill_compute   P.compute_s + P.output_s: first scheduled on P -> P's answer
           kv_transfer       D.kv_transfer_s
           decode_admission  D.queue_s - D.kv_transfer_s: D received -> first scheduled
                             without the transfer (handshake, block allocation, queueing)
           first_token       R_D + relay - D.queue_s: D first scheduled -> the token handed to
                             the client, the decode call's HTTP transit included
    WRITE  proxy_queue       received -> P and D sent (at once)
           prefill_compute   P.compute_s
           kv_transfer       P.kv_transfer_s
           decode_admission  D.kv_to_scheduled_s: write_done received -> D first scheduled
           prefill_queue     D.queue_s minus the three above: P's queue as seen from D's
                             arrival (a WRITE prefill waits for the decode's blocks, so what it
                             waited before D had the request is arrival skew, not TTFT), plus
                             the write_done notification's transit
           first_token       as READ
    local  (a prompt under --local-prefill-threshold: D alone) prefill_queue = D.queue_s,
           prefill_compute = D.compute_s, kv_transfer = decode_admission = 0,
           first_token = the rest.
    READ, the token streamed by the proxy (proxy/first_token.py): proxy_queue = received ->
           prefill sent, prefill_queue and prefill_compute as READ, kv_transfer =
           decode_admission = 0, first_token = prefill answered -> the proxy's chunk written.

    first token from the prefill (``--first-token prefill``, the default): D emits P's token
           when it has it (READ: on arrival once the prefill is identified; WRITE: at P's
           first_token message, else at write_done), before any step, so
           D.compute_s is 0, kv_transfer is 0 (the KV moves after the first token), READ's
           decode_admission is D received -> that token's output, and WRITE's (no
           D.kv_to_scheduled_s) is 0 with prefill_queue = D.queue_s - P.compute_s.

The phases sum to ttft_s by construction: the cross-process transit (HTTP, IPC) is put in a
named phase, and every other part is measured inside one process. WRITE's prefill_queue is
clamped at 0 (a decode is scheduled only after P's compute and transfer, so only measurement
noise could make it negative). A phase whose instance sent no timings is None.
"""

from __future__ import annotations

from typing import Any

import msgspec

TIMINGS_FIELD = "disagg_timings"
"""Request field (bool) asking for the timings, and the response field that carries them."""
PHASES = ("proxy_queue", "prefill_queue", "prefill_compute", "kv_transfer", "decode_admission",
          "first_token")
"""The proxy's phases of TTFT, in the order they happen (keys ``<phase>_s``)."""
INSTANCE_PHASES = ("queue", "compute", "output", "kv_transfer")
"""An instance's own phases (keys ``<phase>_s`` of InstanceTimings)."""


class EngineTimings(msgspec.Struct, array_like=True):
    """Durations the engine core measured for one request (seconds)."""

    queue_s: float
    compute_s: float
    hold_s: float
    kv_transfer_s: float | None = None
    kv_to_scheduled_s: float | None = None


class InstanceTimings(msgspec.Struct, kw_only=True):
    """An instance's ``disagg_timings`` (seconds; definitions in this module's docstring)."""

    queue_s: float
    compute_s: float
    output_s: float
    total_s: float
    kv_transfer_s: float | None = None
    kv_to_scheduled_s: float | None = None


def instance_timings(received_s: float, first_output_s: float | None, answered_s: float,
                     engine: EngineTimings | None) -> InstanceTimings:
    """An instance's timings from its API server's instants (its own clock) and the engine's
    durations: the engine's compute and hold are carried over as durations, the queue is what
    is left of received -> first output (no engine timings: everything before it)."""
    first_s = answered_s if first_output_s is None else first_output_s
    compute_s = engine.compute_s if engine is not None else 0.0
    hold_s = engine.hold_s if engine is not None else 0.0
    total_s = answered_s - received_s
    queue_s = max(0.0, min(total_s, first_s - received_s - compute_s - hold_s))
    return InstanceTimings(queue_s=queue_s, compute_s=compute_s,
                           output_s=total_s - queue_s - compute_s, total_s=total_s,
                           kv_transfer_s=engine.kv_transfer_s if engine is not None else None,
                           kv_to_scheduled_s=engine.kv_to_scheduled_s if engine else None)


def parse_instance_timings(obj: Any) -> InstanceTimings | None:
    """An instance's ``disagg_timings`` object, or None when absent or malformed."""
    if not isinstance(obj, dict):
        return None
    try:
        return msgspec.convert(obj, InstanceTimings)
    except msgspec.ValidationError:
        return None


def timings_dict(t: InstanceTimings) -> dict[str, Any]:
    """The JSON object of an instance's timings."""
    return msgspec.to_builtins(t)  # type: ignore[no-any-return]
