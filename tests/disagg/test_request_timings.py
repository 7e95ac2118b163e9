"""Phase timings of one request on an instance: engine durations, the API server's object,
the ``disagg_timings`` field, the phase histograms (disagg/common/timings.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prom_text import value

from disagg.common.openai_api import CompletionRequest, decode_body
from disagg.common.timings import EngineTimings, instance_timings
from disagg.engine.request_times import RequestTimes


def test_engine_durations_from_instants() -> None:
    t = RequestTimes(first_scheduled_s=10.5, first_token_s=11.0)
    e = t.report(arrival_s=10.0, now_s=11.25)
    assert (e.queue_s, e.compute_s, e.hold_s, e.kv_transfer_s) == (0.5, 0.5, 0.25, None)
    assert t.reported
    # READ decode: the transfer (posted 10.1, done 10.4) ends before its first token
    read = RequestTimes(first_scheduled_s=10.5, first_token_s=11.0, kv_posted_s=10.1,
                        kv_done_s=10.4)
    assert read.kv_transfer_s() == pytest.approx(0.3)
    # layerwise WRITE prefill: posted during the forward; only the tail after the token counts
    layerwise = RequestTimes(first_scheduled_s=10.0, first_token_s=11.0, kv_posted_s=10.2,
                             kv_done_s=11.5)
    assert layerwise.kv_transfer_s() == pytest.approx(0.5)
    # whole-prompt WRITE prefill: posted after the token
    whole = RequestTimes(first_scheduled_s=10.0, first_token_s=11.0, kv_posted_s=11.1,
                         kv_done_s=11.5)
    assert whole.kv_transfer_s() == pytest.approx(0.4)


def test_instance_timings_carry_engine_durations_and_add_up() -> None:
    engine = EngineTimings(queue_s=0.2, compute_s=0.3, hold_s=0.1, kv_transfer_s=0.05)
    t = instance_timings(received_s=100.0, first_output_s=100.7, answered_s=100.75,
                         engine=engine)
    assert t.compute_s == 0.3 and t.kv_transfer_s == 0.05
    assert t.queue_s == pytest.approx(0.3)  # 0.7 to the first output, minus compute and hold
    assert t.total_s == pytest.approx(0.75)
    assert t.queue_s + t.compute_s + t.output_s == pytest.approx(t.total_s)


def test_the_request_field_is_a_typed_bool() -> None:
    req = decode_body(b'{"prompt": "x", "disagg_timings": true}', CompletionRequest)
    assert req.disagg_timings is True
    assert decode_body(b'{"prompt": "x"}', CompletionRequest).disagg_timings is False
    with pytest.raises(Exception, match="disagg_timings"):
        decode_body(b'{"prompt": "x", "disagg_timings": "yes"}', CompletionRequest)


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: {")]


@pytest.mark.parametrize("usage", [False, True])
async def test_timings_in_answer_and_last_chunk_only_when_asked(instance_client: Any,
                                                                usage: bool) -> None:
    client = await instance_client()
    body: dict[str, Any] = {"prompt": "hello", "max_tokens": 3}
    resp = await client.post("/v1/completions", json=body)
    assert "disagg_timings" not in await resp.json()
    resp = await client.post("/v1/completions", json={**body, "disagg_timings": True})
    t = (await resp.json())["disagg_timings"]
    assert set(t) == {"queue_s", "compute_s", "output_s", "total_s", "kv_transfer_s",
                      "kv_to_scheduled_s"}
    assert t["queue_s"] + t["compute_s"] + t["output_s"] == pytest.approx(t["total_s"])
    stream = {**body, "stream": True, "disagg_timings": True,
              "stream_options": {"include_usage": usage}}
    resp = await client.post("/v1/completions", json=stream)
    events = _events(await resp.text())
    carrying = [i for i, e in enumerate(events) if "disagg_timings" in e]
    assert carrying == [len(events) - 1]  # the usage chunk, or the one with finish_reason
    assert ("usage" in events[-1]) is usage
    metrics = await (await client.get("/metrics")).text()
    phase = "disagg_request_phase_seconds"
    assert value(metrics, f"{phase}_count", phase="queue") == 3  # every request
    assert value(metrics, f"{phase}_bucket", phase="kv_transfer", le="+Inf") == 0
