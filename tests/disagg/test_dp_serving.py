"""Data-parallel instances end to end: synced limits, load spread, a hung rank ends cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp
import pytest
import requests  # type: ignore[import-untyped]

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
BASE = ["builtin:tiny-llama", "--device", "cpu", "--admin-key", KEY]


def _rpc(url: str, method: str) -> list[dict[str, Any]]:
    r = requests.post(url + "/collective_rpc", headers=AUTH, json={"method": method},
                      timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


async def _concurrent(url: str, n: int) -> list[int]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def one(i: int) -> int:
            body = {"prompt": f"spread {i} " * (1 + i % 7), "max_tokens": 8 + i % 5,
                    "ignore_eos": True}
            async with s.post(url + "/v1/completions", json=body) as r:
                return r.status

        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.parametrize("dp,lockstep,kv,expect_len,expect_blocks", [
    (3, "1", "0:4MiB,1:2MiB,2:8MiB", 1024, 448),  # 32 KiB blocks of 16 tokens
    (2, "0", "0:4MiB,1:2MiB", 1024, 192),
])
def test_smallest_max_model_len_and_requests_spread(instance_factory, monkeypatch, dp: int,
                                                    lockstep: str, kv: str, expect_len: int,
                                                    expect_blocks: int) -> None:
    monkeypatch.setenv("DISAGG_TEST_RANK_KV_BYTES", kv)
    monkeypatch.setenv("DISAGG_DP_LOCKSTEP", lockstep)
    inst = instance_factory([*BASE, "--max-model-len", "auto", "-dp", str(dp)])
    models = requests.get(inst.url + "/v1/models", timeout=5).json()
    assert models["data"][0]["max_model_len"] == expect_len  # the smallest rank's auto-fit
    info = requests.get(inst.url + "/instance_info", timeout=5).json()
    assert (info["num_gpu_blocks"], info["dp_size"]) == (expect_blocks, dp)
    per_rank = [s["kv_blocks_total"] * 16 for s in _rpc(inst.url, "stats")]
    assert min(per_rank) == expect_len and max(per_rank) > expect_len
    r = requests.post(inst.url + "/v1/completions", timeout=10, json={
        "prompt": [5] * (expect_len - 50), "max_tokens": 100})
    assert r.status_code == 400
    assert f"context length is {expect_len}" in r.json()["error"]["message"]
    for _ in range(2 * dp):  # one at a time: equal loads rotate over the ranks
        r = requests.post(inst.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                          timeout=30)
        assert r.status_code == 200
    assert [s["num_requests_total"] for s in _rpc(inst.url, "stats")] == [2] * dp
    assert asyncio.run(_concurrent(inst.url, 30)) == [200] * 30
    totals = [s["num_requests_total"] for s in _rpc(inst.url, "stats")]
    assert sum(totals) == 2 * dp + 30 and min(totals) >= 2 + 30 // dp - 3, totals


def test_lockstep_rank_that_hangs_ends_the_instance_not_a_deadlock(instance_factory,
                                                                   monkeypatch) -> None:
    monkeypatch.setenv("DISAGG_DP_LOCKSTEP", "1")
    monkeypatch.setenv("DISAGG_DP_COLLECTIVE_TIMEOUT_S", "2")
    inst = instance_factory([*BASE, "--kv-cache-memory-bytes", "16MiB", "-dp", "2"])
    pids = [s["pid"] for s in _rpc(inst.url, "dp_state")]
    os.kill(pids[1], signal.SIGSTOP)  # rank 1 hangs (the fixture's killpg ends it)
    t0 = time.monotonic()
    statuses = asyncio.run(_concurrent(inst.url, 2))  # one request lands on rank 0
    assert 503 in statuses
    inst.proc.wait(30)  # rank 0's all-reduce times out, it exits, the server follows
    elapsed = time.monotonic() - t0
    log = inst.log()
    assert inst.proc.returncode == 1
    assert "state all-reduce among 2 ranks failed" in log
    assert "engine core dp0 died (exit code 3)" in log
    assert elapsed < 25, elapsed
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # rank 0 is gone, not waiting forever
