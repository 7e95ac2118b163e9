"""An instance's request ids, request lines and stats line, over the fake engine (in-process):
vLLM's naming (``cmpl-<X-Request-Id>``), the id echoed, a unique engine id under it."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest

from disagg.server.api_server import ENGINE


async def test_the_request_id_names_the_answer_and_the_log_lines(
        instance_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = await instance_client(log_requests=True)
    engine = client.app[ENGINE]
    caplog.set_level(logging.INFO, logger="disagg.requests")
    body = {"prompt": "hi", "max_tokens": 3, "temperature": 0}
    resp = await client.post("/v1/completions", json=body, headers={"X-Request-Id": "r-1"})
    assert resp.status == 200 and resp.headers["X-Request-Id"] == "r-1"
    assert (await resp.json())["id"] == "cmpl-r-1"
    stream = await client.post("/v1/chat/completions", headers={"X-Request-Id": "r-1"}, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
    assert stream.headers["X-Request-Id"] == "r-1" and '"id":"chatcmpl-r-1"' in \
        await stream.text()
    # a repeated client id still gives the engine two distinct requests
    engine_ids = [r.request_id for r in engine.requests]
    assert len(set(engine_ids)) == 2 and all(re.fullmatch(r"(chat)?cmpl-r-1-[0-9a-f]{8}", i)
                                             for i in engine_ids), engine_ids
    lines = [r.getMessage() for r in caplog.records if r.name == "disagg.requests"]
    assert lines[0].startswith(f"Received request {engine_ids[0]}: prompt_tokens=3, params={{")
    assert '"max_tokens":3' in lines[0] and lines[0].endswith("}, kv_transfer=none")
    assert re.fullmatch(rf"Finished request {engine_ids[0]}: finish_reason=length, "
                        r"prompt_tokens=\d+, output_tokens=3, cached_tokens=0, "
                        r"ttft=\d+\.\d{3} s, e2e=\d+\.\d{3} s", lines[1]), lines[1]
    assert len(lines) == 4
    # no (or no usable) id: a new one, the same in the header, the answer and the engine
    for headers in ({}, {"X-Request-Id": "has space"}):
        resp = await client.post("/v1/completions", json=body, headers=headers)
        rid = resp.headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid) and (await resp.json())["id"] == f"cmpl-{rid}"
        assert engine.requests[-1].request_id == f"cmpl-{rid}"


async def test_the_stats_line_comes_with_activity_and_once_after(
        instance_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = await instance_client(log_stats_interval_s=0.05)
    caplog.set_level(logging.INFO, logger="disagg.stats")
    await asyncio.sleep(0.2)
    assert not caplog.records  # idle from the start: nothing to say
    resp = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    assert resp.status == 200
    for _ in range(100):  # two lines come within ~2 intervals (a busy machine: later)
        if len(caplog.records) >= 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # the interval with the request, then the one that went idle
    assert re.fullmatch(r"Avg prompt throughput: [1-9][\d.]* tokens/s, Avg generation "
                        r"throughput: [1-9][\d.]* tokens/s, Running: 0 reqs, Waiting: 0 reqs, "
                        r"KV cache usage: 0\.0%, Prefix cache hit rate: 0\.0%", lines[0]), lines
    assert lines[1].startswith("Avg prompt throughput: 0.0 tokens/s, Avg generation "
                               "throughput: 0.0 tokens/s")
