"""A real `disagg serve` whose engine core is frozen (SIGSTOP): with a 2 s stall deadline every
request on it ends within 3 s of the stop (503 JSON, or an error event on a started stream),
naming the rank and its silence; a request sent once the stall is known fails at once; after
SIGCONT the rank serves again (it was never marked dead) and the failed requests' blocks are
freed (the frontend aborted them in the engine)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil
import pytest
import requests
from support import Instance

TINY = ["builtin:tiny-llama", "--kv-cache-memory-bytes", "32MiB", "--device", "cpu"]
STALL_S = 2.0
"""DISAGG_ENGINE_STALL_TIMEOUT_S for the instance."""
BUDGET_S = STALL_S + 1.0
"""Every request on the frozen rank ends within this long of the stop (or of its own send)."""
STALLED = "engine core dp0 is not responding: silent for"
FROZEN_SEND_AT_S = 0.5
"""A new request sent this long into the freeze, before the stall is known."""


@dataclass
class Answer:
    """What a client saw: the status, and either the JSON body or the stream's events."""

    status: int
    body: dict[str, Any] | None = None
    events: list[bytes] | None = None
    sent: float = 0.0
    at: float = 0.0


def _engine_process(inst: Instance) -> psutil.Process:
    children = psutil.Process(inst.proc.pid).children(recursive=True)
    engines = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    assert len(engines) == 1, f"expected one engine-core child, got {engines}"
    return engines[0]


async def _post(s: aiohttp.ClientSession, url: str, stream: bool, max_tokens: int = 3000,
                started: asyncio.Event | None = None) -> Answer:
    """One request; a stream is read to its end (``started`` is set at its first event)."""
    sent = time.monotonic()
    body = {"prompt": "keep going", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": stream}
    async with s.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200 or not stream:
            return Answer(resp.status, body=await resp.json(), sent=sent, at=time.monotonic())
        events = []
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                if started is not None:
                    started.set()
        return Answer(resp.status, events=events, sent=sent, at=time.monotonic())


def _assert_503(ans: Answer) -> None:
    assert ans.status == 503 and ans.body is not None, ans
    err = ans.body["error"]
    assert err["code"] == 503 and err["type"] == "server_error", err
    assert STALLED in err["message"] and "stall deadline 2 s" in err["message"], err


def _assert_stream_ended_with_error(ans: Answer) -> None:
    assert ans.status == 200 and ans.events, ans
    tail = [e for e in ans.events if e != b"[DONE]"]
    last = json.loads(tail[-1])
    assert last["error"]["code"] == 503 and STALLED in last["error"]["message"], tail[-3:]
    assert len(tail) >= 2 and "choices" in json.loads(tail[0])  # it had really started


async def _freeze_with_requests_in_flight(inst: Instance, engine: psutil.Process
                                          ) -> tuple[float, list[Answer], list[Answer]]:
    """Two started streams and two plain requests in flight, a SIGSTOP, and one new request
    sent during the freeze; returns the stop time, the in-flight answers and the new one."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        started = [asyncio.Event(), asyncio.Event()]
        streams = [asyncio.create_task(_post(s, inst.url, True, started=ev)) for ev in started]
        plain = [asyncio.create_task(_post(s, inst.url, False)) for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 30)
        await asyncio.sleep(0.3)  # the plain requests reach the engine too
        t0 = time.monotonic()
        engine.suspend()  # SIGSTOP
        await asyncio.sleep(FROZEN_SEND_AT_S)
        new = [asyncio.create_task(_post(s, inst.url, stream=True))]
        tasks = [*streams, *plain, *new]
        _, pending = await asyncio.wait(tasks, timeout=10)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)}/{len(tasks)} requests unanswered 10 s after SIGSTOP"
        return t0, [t.result() for t in [*streams, *plain]], [t.result() for t in new]


async def _post_once(url: str, max_tokens: int) -> Answer:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        return await _post(s, url, False, max_tokens)


def _until_served(url: str, timeout_s: float) -> Answer:
    """The first 200 for a short request, retried while the frontend has not heard the resumed
    rank yet (503 naming the stall), within the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        ans = asyncio.run(_post_once(url, 4))
        if ans.status == 200 or time.monotonic() > deadline:
            return ans
        _assert_503(ans)
        time.sleep(0.1)


def _ledger_clean_within(url: str, timeout_s: float) -> list[dict[str, Any]]:
    """GET /v1/kv_ledger until every block is free (bounded); returns the last ledger."""
    deadline = time.monotonic() + timeout_s
    while True:
        ranks: list[dict[str, Any]] = requests.get(url + "/v1/kv_ledger",
                                                   timeout=10).json()["ranks"]
        if all(r["free"] == r["total"] for r in ranks) or time.monotonic() > deadline:
            return ranks
        time.sleep(0.2)


@pytest.mark.timeout(180)
def test_frozen_engine_core_fails_requests_then_serves_again_after_sigcont(
        instance_factory) -> None:
    inst = instance_factory(TINY, env={"DISAGG_ENGINE_STALL_TIMEOUT_S": str(STALL_S)})
    engine = _engine_process(inst)
    try:
        t0, in_flight, during = asyncio.run(_freeze_with_requests_in_flight(inst, engine))
        for ans in in_flight[:2]:
            _assert_stream_ended_with_error(ans)
        for ans in [*in_flight[2:], *during]:
            _assert_503(ans)  # a stream that had not started is a JSON 503 too
        last_s = max(ans.at for ans in in_flight) - t0
        assert last_s < BUDGET_S, f"last in-flight answer {last_s:.2f} s after SIGSTOP"
        assert during[0].at - during[0].sent < BUDGET_S, during
        known = asyncio.run(_post_once(inst.url, 8))  # the stall is known now: fails at once
        _assert_503(known)
        assert known.at - known.sent < 0.5, f"known stall answered in {known.at - known.sent}"
        assert engine.status() == psutil.STATUS_STOPPED  # still frozen all along
        for path in ("/health", "/instance_info"):  # out of any rotation while frozen
            reply = requests.get(inst.url + path, timeout=10)
            assert reply.status_code == 503 and "not responding" in reply.text, reply.text
        engine.resume()  # SIGCONT
        served = _until_served(inst.url, 5.0)
        for path in ("/health", "/instance_info"):
            assert requests.get(inst.url + path, timeout=10).status_code == 200
        assert served.status == 200 and served.body is not None, served
        assert served.body["choices"][0]["finish_reason"] == "length"
        ranks = _ledger_clean_within(inst.url, 10.0)
        assert all(r["free"] == r["total"] for r in ranks), ranks  # the aborts freed them
        assert inst.proc.poll() is None, "a stall must not take the server down"
        assert "died" not in inst.log() and "Traceback" not in inst.log(), inst.log()
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            engine.resume()
        inst.kill()
