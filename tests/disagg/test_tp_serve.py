"""`disagg serve -tp` as a whole: DP x TP composes, and a SIGKILLed worker rank ends every
request in flight with one clear error naming it, takes the instance down (exit non-zero, a
supervisor restarts it), and a P/D peer that held KV for it gets every block back."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import aiohttp
import psutil
import pytest
import requests  # type: ignore[import-untyped]
from support import Instance

from disagg.common.sampling_params import SamplingParams
from disagg.llm import LLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "connectors"))
from pd_helpers import kv_config, pd_request, wait_clean  # noqa: E402

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


@pytest.mark.timeout(240)
def test_dp_2_by_tp_2_serves_the_tp_1_tokens(instance_factory) -> None:
    """Two DP ranks of two TP ranks each (4 processes on CPU) answer like one TP-1 engine."""

    prompts = [[5, 9, 200, 17], list(range(1, 40)), [(7 * i) % 250 + 1 for i in range(70)]]
    with LLM(device="cpu", kv_cache_memory_bytes=16 * 2**20, max_model_len=512) as llm:
        want = [o.output_token_ids for o in llm.generate(
            prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))]
    inst = instance_factory([*TINY, "--max-model-len", "512", "-dp", "2", "-tp", "2"],
                            ready_timeout_s=180)
    info = requests.get(inst.url + "/instance_info", timeout=5).json()
    assert (info["dp_size"], info["tp_size"]) == (2, 2)

    async def go() -> list[list[int]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async def one(p: list[int]) -> list[int]:
                body = {"prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True}
                async with s.post(inst.url + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    return list((await r.json())["choices"][0]["token_ids"])
            return list(await asyncio.gather(*(one(p) for p in prompts * 2)))

    assert asyncio.run(go()) == want * 2


@pytest.mark.timeout(240)
def test_decode_worker_killed_mid_transfer_peer_frees_its_hold(instance_factory) -> None:
    """D (tp 2) reads from P (tp 1) but its read never completes (an injected stalled post);
    its worker dies: the request fails naming the worker and P's held blocks come back."""
    common = [*TINY, "--max-model-len", "256"]
    # both start at once, so both may take fault rules (P is given none)
    p, d = instance_factory.many(
        [*common, "--kv-transfer-config", kv_config("kv_producer", "read", lease_timeout=3)],
        [*common, "-tp", "2", "--kv-transfer-config",
         kv_config("kv_consumer", "read", lease_timeout=3,
                   faults=[{"at": "post", "action": "stall"}])],
        env={"DISAGG_FAULT_INJECTION": "1"}, ready_timeout_s=120)
    p_info = requests.get(p.url + "/instance_info", timeout=5).json()
    d_info = requests.get(d.url + "/instance_info", timeout=5).json()
    worker = tp_worker(d)
    body = {"prompt": list(range(1, 100)), "max_tokens": 4, "temperature": 0}

    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            task = asyncio.create_task(pd_request(s, p.url, d.url, body, "read", p_info,
                                                  d_info))
            deadline = time.monotonic() + 30
            while requests.get(p.url + "/v1/kv_ledger", timeout=5).json()["ranks"][0][
                    "held"] == 0:
                assert time.monotonic() < deadline, "P never held the prompt's blocks"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # D has posted its (stalled) read
            worker.kill()
            return await asyncio.wait_for(task, 30)

    status, out = asyncio.run(go())
    assert LINE in _error_text(status, out), out
    wait_clean(p.url, timeout_s=15)
