"""A real `disagg serve` whose engine core is SIGKILLed: every pending request and every new one
gets an answer within 2 s (503 JSON, or an error event on a started stream), and the server
exits non-zero within 2 s with one readable line, so a supervisor restarts it at once."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil
import pytest
from support import Instance

TINY = ["builtin:tiny-llama", "--kv-cache-memory-bytes", "32MiB", "--device", "cpu"]
DEATH = "engine core dp0 died (exit code -9)"
BUDGET_S = 2.0
"""Every answer, and the server's exit, within this long of the kill."""
NEW_REQUESTS, NEW_REQUEST_GAP_S = 40, 0.025
"""New requests keep arriving for a second after the kill: one that lands after the engine's
input pipe is gone but before the death is noticed must not wait forever on its send."""


@dataclass
class Answer:
    """What a client saw: the status, and either the JSON body or the stream's events."""

    status: int | None
    body: dict[str, Any] | None = None
    events: list[bytes] | None = None
    refused: bool = False
    at: float = 0.0


def _engine_process(inst: Instance) -> psutil.Process:
    children = psutil.Process(inst.proc.pid).children(recursive=True)
    engines = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    assert len(engines) == 1, f"expected one engine-core child, got {engines}"
    return engines[0]


def _body(stream: bool) -> dict[str, Any]:
    return {"prompt": "keep going", "max_tokens": 3000, "ignore_eos": True, "stream": stream}


async def _post(s: aiohttp.ClientSession, url: str, stream: bool,
                started: asyncio.Event | None = None) -> Answer:
    """One request; a stream is read to its end (``started`` is set at its first event)."""
    try:
        async with s.post(url + "/v1/completions", json=_body(stream)) as resp:
            if resp.status != 200 or not stream:
                return Answer(resp.status, body=await resp.json(), at=time.monotonic())
            events = []
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip())
                    if started is not None:
                        started.set()
            return Answer(resp.status, events=events, at=time.monotonic())
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError):
        # the server is gone (refused, or it closed a connection it accepted as it exited):
        # an answer too for a request sent after the kill; an in-flight one still needs its
        # 503 (plain) or its error event (stream), which the callers check
        return Answer(None, refused=True, at=time.monotonic())


def _assert_503(ans: Answer) -> None:
    assert ans.status == 503 and ans.body is not None, ans
    err = ans.body["error"]
    assert err["code"] == 503 and err["type"] == "server_error" and DEATH in err["message"]


def _assert_stream_ended_with_error(ans: Answer) -> None:
    assert ans.status == 200 and ans.events, ans
    tail = [e for e in ans.events if e != b"[DONE]"]
    last = json.loads(tail[-1])
    assert last["error"]["code"] == 503 and DEATH in last["error"]["message"], ans.events[-3:]
    assert len(tail) >= 2 and "choices" in json.loads(tail[0])  # it had really started


async def _kill_with_requests_in_flight(inst: Instance) -> tuple[float, list[Answer],
                                                                   list[Answer], list[Answer]]:
    """Two started streams and two plain requests in flight, a kill, then a new request every
    25 ms; returns the kill time and the answers (started streams, in flight, new)."""
    engine = _engine_process(inst)
    conn = aiohttp.TCPConnector(force_close=True, limit=0)  # no reuse of a closing connection
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=30)) as s:
        started = [asyncio.Event(), asyncio.Event()]
        streams = [asyncio.create_task(_post(s, inst.url, True, ev)) for ev in started]
        plain = [asyncio.create_task(_post(s, inst.url, False)) for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 30)
        await asyncio.sleep(0.2)  # the plain requests reach the engine too
        t0 = time.monotonic()
        engine.kill()
        new = []
        for i in range(NEW_REQUESTS):  # before, while and after the death is noticed
            new.append(asyncio.create_task(_post(s, inst.url, stream=i % 2 == 1)))
            await asyncio.sleep(NEW_REQUEST_GAP_S)
        tasks = [*streams, *plain, *new]
        _, pending = await asyncio.wait(tasks, timeout=10)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)}/{len(tasks)} requests unanswered 10 s after the kill"
        done = [task.result() for task in tasks]
    return t0, done[:2], done[2:4], done[4:]


def _exit_within(inst: Instance, t0: float, timeout_s: float) -> float:
    """Seconds from t0 to the server's exit (polled: the test must not block past the budget)."""
    while inst.proc.poll() is None and time.monotonic() - t0 < timeout_s:
        time.sleep(0.01)
    assert inst.proc.poll() is not None, f"server still running {timeout_s} s after the kill"
    return time.monotonic() - t0


@pytest.mark.timeout(120)
def test_killed_engine_core_answers_everything_and_exits_fast(instance_factory) -> None:
    inst = instance_factory(TINY)
    t0, streams, plain, new = asyncio.run(_kill_with_requests_in_flight(inst))
    exit_s = _exit_within(inst, t0, 10.0)
    for ans in streams:
        _assert_stream_ended_with_error(ans)
    for ans in plain:
        _assert_503(ans)
    for ans in new:
        if not ans.refused:
            _assert_503(ans)  # a stream that had not started is a JSON 503 too
    assert not all(ans.refused for ans in new[:2]), "the first new requests should get a 503"
    answer_s = max(ans.at for ans in [*streams, *plain, *new]) - t0
    assert answer_s < BUDGET_S, f"last answer {answer_s:.2f} s after the kill"
    assert exit_s < BUDGET_S, f"server exited {exit_s:.2f} s after the kill"
    assert inst.proc.returncode == 1
    log = inst.log()
    assert f"disagg: error: {DEATH}; shutting down" in log
    assert "Traceback" not in log, log
