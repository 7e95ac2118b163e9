"""Pausing a prefill instance in the middle of WRITE-mode transfers: the paused producer keeps
serving its peer (its connector still runs), every transfer finishes or fails explicitly, and
every block is free on both sides once idle."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from typing import Any

import aiohttp
import requests  # type: ignore[import-untyped]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "connectors"))
from pd_helpers import BASE, info, kv_config, pd_request, wait_clean  # noqa: E402

KEY = "pd-admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
# defer_timeout bounds a transfer before its peer's first lease: the prefill reads the
# decode's announcement between steps, and on a loaded 2-core machine one step of a dozen
# prefills took ~3 s (a 3 s defer_timeout then expired transfers before any pause)
FAST = {"transfer_timeout": 3, "defer_timeout": 5, "lease_timeout": 2,
        "heartbeat_interval": 0.5}
EXPLICIT = ("KV transfer", "paused with mode=abort")


async def _producer_busy(s: aiohttp.ClientSession, p_url: str) -> bool:
    async with s.post(f"{p_url}/collective_rpc", headers=AUTH, json={"method": "stats"}) as r:
        stats = (await r.json())["results"][0]
    return bool(stats["num_running"] + stats["num_waiting"]
                + stats["connector"]["transfers_active"])


async def _pause_during_transfers(s: aiohttp.ClientSession, p_url: str, d_url: str,
                                  p_info: dict[str, Any], d_info: dict[str, Any], mode: str,
                                  rng: random.Random) -> list[tuple[int, dict[str, Any]]]:
    async def one(i: int) -> tuple[int, dict[str, Any]]:
        body = {"prompt": [(i * 31 + k) % 300 + 1 for k in range(300 + 20 * i)],
                "max_tokens": 6, "ignore_eos": True}
        await asyncio.sleep(rng.uniform(0, 0.4))  # some arrive only while P is paused
        return await pd_request(s, p_url, d_url, body, "write", p_info, d_info)

    tasks = [asyncio.ensure_future(one(i)) for i in range(12)]
    deadline = time.monotonic() + 10
    while not await _producer_busy(s, p_url):  # pause in the middle of prefills/transfers
        assert time.monotonic() < deadline, "the producer never had work in flight"
    async with s.post(f"{p_url}/pause?mode={mode}&timeout=30", headers=AUTH) as r:
        assert r.status == 200, await r.text()
    await asyncio.sleep(6.0)  # longer than the connector's defer/lease timeouts
    async with s.post(f"{p_url}/resume", headers=AUTH) as r:
        assert r.status == 200
    return list(await asyncio.wait_for(asyncio.gather(*tasks), 60))


def test_pausing_a_write_prefill_strands_nothing(instance_factory) -> None:
    p, d = instance_factory.many(
        [*BASE, "--admin-key", KEY, "--kv-transfer-config",
         kv_config("kv_producer", "write", **FAST)],
        [*BASE, "--kv-transfer-config", kv_config("kv_consumer", "write", **FAST)])
    p_info, d_info = info(p.url), info(d.url)
    rng = random.Random()
    for mode in ("keep", "wait", "abort"):
        async def go(mode: str) -> list[tuple[int, dict[str, Any]]]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as s:
                return await _pause_during_transfers(s, p.url, d.url, p_info, d_info, mode,
                                                     rng)

        results = asyncio.run(go(mode))
        for status, body in results:  # finished, or failed with a reason that says why
            assert status == 200 or any(e in body["error"]["message"] for e in EXPLICIT), body
        if mode != "abort":  # leases kept every paused transfer alive: all of them finish
            assert [status for status, _ in results] == [200] * len(results), (mode, results)
        wait_clean(p.url, timeout_s=15)
        wait_clean(d.url, timeout_s=15)
    r = requests.post(d.url + "/pause", headers=AUTH, timeout=5)  # no --admin-key there
    assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"]
