"""A `disagg serve -tp 2` whose worker rank is SIGKILLed: every request in flight ends with one
clear error naming the dead worker, the instance exits non-zero (a supervisor restarts it), and
a P/D peer that held KV for it gets its blocks back."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import psutil
import pytest
from support import Instance

TINY = ["builtin:tiny-llama", "--kv-cache-memory-bytes", "16MiB", "--device", "cpu"]
LINE = "tensor-parallel worker tp1"


def tp_worker(inst: Instance) -> psutil.Process:
    procs = [c for c in psutil.Process(inst.proc.pid).children(recursive=True)
             if "disagg.engine.tp_worker" in " ".join(c.cmdline())]
    assert len(procs) == 1, procs
    return procs[0]


async def _post(s: aiohttp.ClientSession, url: str, body: dict[str, Any],
                started: asyncio.Event | None = None) -> tuple[int, Any]:
    async with s.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200 or not body.get("stream"):
            return resp.status, await resp.json()
        events = []
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                if started is not None:
                    started.set()
        return resp.status, events


def _error_text(status: int, body: Any) -> str:
    if isinstance(body, list):  # a stream: its last event before [DONE] is the error
        tail = [e for e in body if e != b"[DONE]"]
        return str(json.loads(tail[-1]).get("error", {}).get("message", ""))
    assert status != 200, body
    return str(body["error"]["message"])


@pytest.mark.timeout(180)
def test_killed_worker_fails_requests_and_takes_the_instance_down(instance_factory) -> None:
    inst = instance_factory([*TINY, "-tp", "2"], ready_timeout_s=120)
    worker = tp_worker(inst)
    body = {"prompt": "keep going", "max_tokens": 3000, "ignore_eos": True}

    async def go() -> list[tuple[int, Any]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            started = asyncio.Event()
            tasks = [asyncio.create_task(_post(s, inst.url, {**body, "stream": True}, started)),
                     asyncio.create_task(_post(s, inst.url, body))]
            await asyncio.wait_for(started.wait(), 60)
            await asyncio.sleep(0.2)
            worker.kill()
            done, pending = await asyncio.wait(tasks, timeout=20)
            assert not pending, "requests unanswered 20 s after the worker died"
            return [t.result() for t in tasks]

    t0 = time.monotonic()
    answers = asyncio.run(go())
    for status, got in answers:
        assert LINE in _error_text(status, got), got
    while inst.proc.poll() is None and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    assert inst.proc.returncode not in (None, 0)
    log = inst.log()
    assert LINE in log and "killed by signal 9" in log
    assert "Traceback" not in log, log
