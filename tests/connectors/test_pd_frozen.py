"""Frozen and restarted peers end their requests within the configured deadlines.

A peer frozen with SIGSTOP (its engine core: the KV server thread and the control plane stop,
its API server still answers) must not hold the other side's requests past the transfer's own
deadlines, and the frozen side's own frontend ends them at its stall deadline (lease_timeout);
a prefill restarted on the same ports is another peer, whose predecessor's KV is gone: the
decode fails fast with a clear error instead of waiting or reading the new process's blocks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp
import pytest
import requests  # type: ignore[import-untyped]
from pd_helpers import BASE, engine_core, info, kv_config, pd_request, wait_clean

from proxy.local_instances import find_port_blocks

TIMEOUTS: dict[str, Any] = {"transfer_timeout": 2, "defer_timeout": 2, "lease_timeout": 1.5,
                            "heartbeat_interval": 0.3}
DEADLINE_S = max(TIMEOUTS["transfer_timeout"], TIMEOUTS["defer_timeout"]) + 1.0
SLACK_S = 1.5
"""Scheduling noise on a loaded 2-core machine (processes, thread switches)."""
BODY: dict[str, Any] = {"prompt": [(3 * i) % 200 + 1 for i in range(40)], "max_tokens": 4,
                        "temperature": 0, "ignore_eos": True, "return_token_ids": True}


def _pair(instance_factory: Any, mode: str, **p_extra: Any) -> tuple[Any, Any]:
    p, d = instance_factory.many(
        [*BASE, "--kv-transfer-config", kv_config("kv_producer", mode, **TIMEOUTS, **p_extra)],
        [*BASE, "--kv-transfer-config", kv_config("kv_consumer", mode, **TIMEOUTS)])
    return p, d


async def _timed(p: Any, d: Any, mode: str, p_info: dict[str, Any],
                 d_info: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        t0 = time.monotonic()
        status, out = await pd_request(s, p.url, d.url, BODY, mode, p_info, d_info)
        return time.monotonic() - t0, status, out


@pytest.mark.parametrize(("mode", "frozen"), [("read", "p"), ("write", "p"), ("write", "d")])
def test_a_frozen_peer_ends_requests_within_the_deadlines(instance_factory, mode: str,
                                                          frozen: str) -> None:
    p, d = _pair(instance_factory, mode)
    p_info, d_info = info(p.url), info(d.url)
    victim = engine_core((p if frozen == "p" else d).proc.pid)
    if mode == "read":  # freeze P after it answered: the decode's read hits a frozen server
        async def go() -> tuple[float, int, dict[str, Any]]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                body = {**BODY, "max_tokens": 1, "stream": False, "kv_transfer_params": {
                    "transfer_id": "frozen-read", "do_remote_decode": True, "mode": "read"}}
                async with s.post(p.url + "/v1/completions", json=body) as r:
                    params = (await r.json())["kv_transfer_params"]
                os.kill(victim.pid, signal.SIGSTOP)
                t0 = time.monotonic()
                async with s.post(d.url + "/v1/completions", json={**BODY, "kv_transfer_params": {
                        **params, "do_remote_prefill": True}}) as r:
                    return time.monotonic() - t0, r.status, await r.json()
        coro = go()
    else:
        os.kill(victim.pid, signal.SIGSTOP)
        coro = _timed(p, d, mode, p_info, d_info)
    try:
        elapsed, status, out = asyncio.run(coro)
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    assert status >= 500 and out["error"]["message"], out
    assert elapsed < DEADLINE_S + SLACK_S, (elapsed, out)
    wait_clean(p.url, timeout_s=20)
    wait_clean(d.url, timeout_s=20)
    for inst in (p, d):  # both serve again after the thaw
        r = requests.post(inst.url + "/v1/completions", json=BODY, timeout=30)
        assert r.status_code == 200, r.text


def test_a_prefill_restarted_on_the_same_ports_is_another_peer(instance_factory) -> None:
    base = find_port_blocks(1, 2)[0]  # the handshake and notify ports of rank 0
    p, d = instance_factory.many(
        [*BASE, "--kv-transfer-config", kv_config("kv_producer", "read", **TIMEOUTS,
                                                  base_port=base)],
        [*BASE, "--kv-transfer-config", kv_config("kv_consumer", "read", **TIMEOUTS)])
    body = {**BODY, "max_tokens": 1, "kv_transfer_params": {
        "transfer_id": "restart", "do_remote_decode": True, "mode": "read"}}
    params = requests.post(p.url + "/v1/completions", json=body, timeout=30).json()[
        "kv_transfer_params"]
    p.kill()
    p2 = instance_factory([*BASE, "--kv-transfer-config",
                           kv_config("kv_producer", "read", **TIMEOUTS, base_port=base)])
    assert info(p2.url)["kv_handshake_port"] == params["remote_handshake_port"]
    t0 = time.monotonic()
    r = requests.post(d.url + "/v1/completions", timeout=30, json={
        **BODY, "kv_transfer_params": {**params, "do_remote_prefill": True}})
    assert r.status_code >= 500 and "restarted" in r.json()["error"]["message"], r.text
    assert time.monotonic() - t0 < DEADLINE_S + SLACK_S
    wait_clean(d.url)
    wait_clean(p2.url)
