"""Pause / resume / collective_rpc over HTTP on real DP instances (2 and 3 ranks, lockstep).

The key scenario (vLLM's deadlock, seed note 003): pause, barrier, a new request, barrier,
resume, many times with randomized timing and modes; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import requests  # type: ignore[import-untyped]
from support import Instance, start_instance

KEY = "test-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BASE = ["builtin:tiny-llama", "--kv-cache-memory-bytes", "16MiB", "--device", "cpu",
        "--admin-key", KEY]
ABORTED = "paused with mode=abort"
ROUNDS = int(os.environ.get("DISAGG_TEST_PAUSE_ROUNDS", "20"))
"""Pause / barrier / request / barrier rounds per instance (200 for the long acceptance run);
every 3 rounds use each pause mode once, in a random order."""
EP_ROUNDS = int(os.environ.get("DISAGG_TEST_PAUSE_ROUNDS", "9"))
"""The same for the expert-parallel instance, whose rounds cost several times more (an
all-to-all per MoE layer and step): lockstep2 runs the same lockstep pause protocol for ROUNDS,
this adds the all-to-all in every step of it."""
MODES = ("abort", "wait", "keep")


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _instance(tmp_path_factory: Any, dp: int, lockstep: bool,
              args: tuple[str, ...] = ()) -> Iterator[Instance]:
    """``args`` replace the model (the first of BASE) when given."""
    base = [*args, *BASE[1:]] if args else BASE
    with _env(DISAGG_DP_LOCKSTEP="1" if lockstep else "0"):
        inst = start_instance([*base, "--data-parallel-size", str(dp)],
                              tmp_path_factory.mktemp(f"dp{dp}"))
    try:
        yield inst
    finally:
        inst.stop()


@pytest.fixture(scope="module")
def lockstep2(tmp_path_factory: Any) -> Iterator[Instance]:
    yield from _instance(tmp_path_factory, 2, lockstep=True)


@pytest.fixture  # one test's instance: stopped as soon as it is done
def lockstep3(tmp_path_factory: Any) -> Iterator[Instance]:
    yield from _instance(tmp_path_factory, 3, lockstep=True)


@pytest.fixture  # one test's instance: stopped as soon as it is done
def expert_parallel2(tmp_path_factory: Any) -> Iterator[Instance]:
    """An MoE model with its experts over 2 ranks: every step is an all-to-all among them."""
    yield from _instance(tmp_path_factory, 2, lockstep=False,
                         args=("builtin:tiny-moe", "--enable-expert-parallel"))


@pytest.fixture  # one test's instance: stopped as soon as it is done
def plain2(tmp_path_factory: Any) -> Iterator[Instance]:
    yield from _instance(tmp_path_factory, 2, lockstep=False)


# ---- helpers ------------------------------------------------------------------------------
def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))


async def _call(s: aiohttp.ClientSession, method: str, url: str,
                **kw: Any) -> tuple[int, dict[str, Any]]:
    async with s.request(method, url, headers=kw.pop("headers", AUTH), **kw) as r:
        return r.status, await r.json()


async def _complete(s: aiohttp.ClientSession, url: str, max_tokens: int,
                    **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"prompt": "pause test prompt", "max_tokens": max_tokens, "ignore_eos": True,
            **extra}
    async with s.post(url + "/v1/completions", json=body) as r:
        return r.status, await r.json()


async def _stream(s: aiohttp.ClientSession, url: str, max_tokens: int,
                  chunks: list[dict[str, Any]]) -> None:
    body = {"prompt": "stream under pause", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    async with s.post(url + "/v1/completions", json=body) as r:
        async for line in r.content:
            text = line.decode().strip()
            if text.startswith("data: ") and text != "data: [DONE]":
                chunks.append(json.loads(text[6:]))


def _tokens(chunks: list[dict[str, Any]]) -> int:
    return sum(1 for c in chunks if c.get("choices") and c["choices"][0]["text"] is not None
               and "error" not in c)


async def _barrier(s: aiohttp.ClientSession, url: str, size: int, stagger_s: float) -> None:
    status, body = await _call(s, "POST", url + "/collective_rpc", json={
        "method": "barrier", "args": {"timeout_s": 20, "stagger_s": stagger_s},
        "timeout": 30})
    assert status == 200, body
    assert [r["dp_rank"] for r in body["results"]] == list(range(size))


def _ledger_clean(url: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        ranks = requests.get(url + "/v1/kv_ledger", timeout=5).json()["ranks"]
        if all(r["free"] == r["total"] and r["held"] == 0 for r in ranks):
            return
        assert time.monotonic() < deadline, ranks
        time.sleep(0.1)


# ---- pause, barrier, request, barrier: never a deadlock -------------------------------------
async def _round(s: aiohttp.ClientSession, url: str, size: int, rng: random.Random,
                 mode: str) -> None:
    inflight = [asyncio.ensure_future(_complete(s, url, rng.randint(1, 40)))
                for _ in range(rng.randint(0, 3))]
    await asyncio.sleep(rng.uniform(0, 0.05))
    status, body = await _call(s, "POST", f"{url}/pause?mode={mode}&timeout=30")
    assert status == 200 and body["paused"], body
    await _barrier(s, url, size, rng.uniform(0, 0.02))
    new = asyncio.ensure_future(_complete(s, url, rng.randint(1, 8)))
    await asyncio.sleep(rng.uniform(0, 0.05))
    await _barrier(s, url, size, rng.uniform(0, 0.02))
    assert not new.done(), "a request ran while the instance was paused"
    status, body = await _call(s, "POST", f"{url}/resume?timeout=30")
    assert status == 200 and not body["paused"], body
    results = await asyncio.wait_for(asyncio.gather(*inflight, new), 30)
    assert results[-1][0] == 200, results[-1]
    for status, body in results[:-1]:
        assert status == 200 or (mode == "abort" and ABORTED in body["error"]["message"]), body


@pytest.mark.parametrize("fixture,size", [
    ("lockstep2", 2), pytest.param("lockstep3", 3, marks=pytest.mark.slow), ("plain2", 2),
    ("expert_parallel2", 2)])
def test_pause_barrier_request_barrier_never_deadlocks(request: Any, fixture: str,
                                                       size: int) -> None:
    inst: Instance = request.getfixturevalue(fixture)
    seed = random.randrange(2**32)
    rng = random.Random(seed)

    rounds = EP_ROUNDS if fixture == "expert_parallel2" else ROUNDS

    async def go() -> None:
        async with _session() as s:
            modes: list[str] = []
            for _ in range(rounds):
                if not modes:
                    modes = rng.sample(MODES, len(MODES))
                await _round(s, inst.url, size, rng, modes.pop())

    asyncio.run(asyncio.wait_for(go(), 150 * max(1, rounds // 20)))
    assert requests.get(inst.url + "/health", timeout=5).status_code == 200, f"seed {seed}"
    _ledger_clean(inst.url)


# ---- each mode with requests running ---------------------------------------------------------
async def _held_then_resumed(s: aiohttp.ClientSession, url: str) -> None:
    """A request sent while paused waits, and runs after resume."""
    new = asyncio.ensure_future(_complete(s, url, 4))
    await asyncio.sleep(0.3)
    assert not new.done()
    status, body = await _call(s, "GET", url + "/is_paused")
    assert status == 200 and body["paused"]
    status, body = await _call(s, "POST", url + "/resume")
    assert status == 200 and body == {"paused": False, "state": "running", "mode": None}
    status, body = await asyncio.wait_for(new, 30)
    assert status == 200 and body["usage"]["completion_tokens"] == 4


async def _mode_keep(s: aiohttp.ClientSession, url: str) -> None:
    chunks: list[dict[str, Any]] = []
    stream = asyncio.ensure_future(_stream(s, url, 300, chunks))
    await _until(lambda: _tokens(chunks) >= 5)
    status, body = await _call(s, "POST", url + "/pause?mode=keep")
    assert status == 200 and body == {"paused": True, "state": "paused", "mode": "keep"}
    await asyncio.sleep(0.2)  # tokens already on their way out
    frozen = _tokens(chunks)
    await asyncio.sleep(0.5)
    assert _tokens(chunks) == frozen < 300, "a kept request advanced while paused"
    await _held_then_resumed(s, url)
    await asyncio.wait_for(stream, 30)
    assert _tokens(chunks) == 300 and chunks[-1]["choices"][0]["finish_reason"] == "length"


async def _mode_abort(s: aiohttp.ClientSession, url: str) -> None:
    chunks: list[dict[str, Any]] = []
    stream = asyncio.ensure_future(_stream(s, url, 2000, chunks))
    plain = [asyncio.ensure_future(_complete(s, url, 2000)) for _ in range(2)]
    await _until(lambda: _tokens(chunks) >= 2)
    status, body = await _call(s, "POST", url + "/pause?mode=abort")
    assert status == 200 and body["mode"] == "abort"
    for status, body in await asyncio.wait_for(asyncio.gather(*plain), 10):
        assert status >= 500 and ABORTED in body["error"]["message"], body
    await asyncio.wait_for(stream, 10)
    assert ABORTED in chunks[-1]["error"]["message"]
    await _held_then_resumed(s, url)


async def _mode_wait(s: aiohttp.ClientSession, url: str) -> None:
    running = [asyncio.ensure_future(_complete(s, url, 60)) for _ in range(3)]
    await asyncio.sleep(0.05)
    status, body = await _call(s, "POST", url + "/pause?mode=wait&timeout=30")
    assert status == 200 and body["mode"] == "wait"
    for status, body in await asyncio.wait_for(asyncio.gather(*running), 5):
        assert status == 200 and body["usage"]["completion_tokens"] == 60
    await _held_then_resumed(s, url)


async def _wait_past_deadline(s: aiohttp.ClientSession, url: str) -> None:
    """A wait-mode pause that misses its deadline: 504, stays pausing, then completes."""
    running = asyncio.ensure_future(_complete(s, url, 400))
    await asyncio.sleep(0.05)
    status, body = await _call(s, "POST", url + "/pause?mode=wait&timeout=0.05")
    assert status == 504 and "stays pausing" in body["error"]["message"], body
    status, body = await _call(s, "POST", url + "/pause?mode=keep")
    assert status == 409 and "in progress" in body["error"]["message"]
    assert (await asyncio.wait_for(running, 30))[0] == 200
    await _until(lambda: requests.get(url + "/is_paused", headers=AUTH,
                                      timeout=5).json()["state"] == "paused")
    status, _ = await _call(s, "POST", url + "/resume")
    assert status == 200


async def _until(cond: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("scenario", [_mode_keep, _mode_abort, _mode_wait, _wait_past_deadline],
                         ids=["keep", "abort", "wait", "wait-deadline"])
def test_pause_modes_with_requests_running(lockstep2: Instance, scenario: Any) -> None:
    async def go() -> None:
        async with _session() as s:
            await scenario(s, lockstep2.url)

    try:
        asyncio.run(asyncio.wait_for(go(), 90))
    finally:  # never leave the shared instance paused for the next test
        requests.post(lockstep2.url + "/resume", headers=AUTH, timeout=30)
    _ledger_clean(lockstep2.url)


# ---- errors ---------------------------------------------------------------------------------
def test_auth_conflicts_and_bad_input_are_clear(lockstep2: Instance) -> None:
    url = lockstep2.url
    assert requests.post(url + "/pause", timeout=5).status_code == 401
    r = requests.get(url + "/is_paused", headers={"Authorization": "Bearer nope"}, timeout=5)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
    r = requests.post(url + "/resume", headers=AUTH, timeout=5)
    assert r.status_code == 409 and "not paused" in r.json()["error"]["message"]
    r = requests.post(url + "/pause?mode=later", headers=AUTH, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"
    r = requests.post(url + "/collective_rpc", headers=AUTH, json={"method": "exec"}, timeout=5)
    assert r.status_code == 400 and "unknown method 'exec'" in r.json()["error"]["message"]
    r = requests.post(url + "/collective_rpc", headers=AUTH, timeout=5,
                      json={"method": "barrier", "args": {"timeout_s": -1}})
    assert r.status_code == 400
    try:
        assert requests.post(url + "/pause?mode=keep", headers=AUTH, timeout=30).ok
        r = requests.post(url + "/pause?mode=abort", headers=AUTH, timeout=5)
        assert r.status_code == 409 and "already paused (mode=keep)" in r.json()["error"][
            "message"]
        assert requests.post(url + "/resume", headers=AUTH, timeout=30).ok
    finally:
        requests.post(url + "/resume", headers=AUTH, timeout=30)
    r = requests.post(url + "/resume", headers=AUTH, timeout=5)
    assert r.status_code == 409
    stats = requests.post(url + "/collective_rpc", headers=AUTH, json={"method": "dp_state"},
                          timeout=10).json()["results"]
    assert [s["pause_state"] for s in stats] == ["running", "running"]
    assert all(s["lockstep"] for s in stats)
