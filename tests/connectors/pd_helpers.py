"""Drive a prefill and a decode instance directly with kv_transfer_params (no proxy)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

import aiohttp
import requests  # type: ignore[import-untyped]

BASE = ["builtin:tiny-llama", "--kv-cache-memory-bytes", "16MiB", "--device", "cpu"]


def kv_config(role: str, mode: str, transport: str = "tcp", **extra: Any) -> str:
    """--kv-transfer-config JSON."""
    return json.dumps({"kv_connector": "PDConnector", "kv_role": role,
                       "kv_connector_extra_config": {"transport": transport, "mode": mode,
                                                     **extra}})


def info(url: str) -> dict[str, Any]:
    """GET /instance_info."""
    return dict(requests.get(url + "/instance_info", timeout=5).json())


def remote_of(i: dict[str, Any]) -> dict[str, Any]:
    """An instance's connector address as kv_transfer_params fields."""
    return {"remote_engine_id": i["engine_id"], "remote_host": i["kv_host"],
            "remote_handshake_port": i["kv_handshake_port"],
            "remote_notify_port": i["kv_notify_port"]}


async def pd_request(s: aiohttp.ClientSession, p_url: str, d_url: str, body: dict[str, Any],
                     mode: str, p_info: dict[str, Any], d_info: dict[str, Any]
                     ) -> tuple[int, dict[str, Any]]:
    """One P/D request; returns the decode's (status, json)."""
    tid = uuid.uuid4().hex
    p_body = {**body, "max_tokens": 1, "stream": False}
    if mode == "read":
        p_body["kv_transfer_params"] = {"transfer_id": tid, "do_remote_decode": True,
                                        "mode": "read"}
        async with s.post(p_url + "/v1/completions", json=p_body) as r:
            p_json = await r.json()
            if r.status != 200:
                return r.status, p_json
        params = {**p_json["kv_transfer_params"], "do_remote_prefill": True,
                  "transfer_id": tid}
        async with s.post(d_url + "/v1/completions",
                          json={**body, "kv_transfer_params": params}) as r:
            return r.status, await r.json()
    p_body["kv_transfer_params"] = {"transfer_id": tid, "do_remote_decode": True,
                                    "mode": "write", **remote_of(d_info)}
    d_body = {**body, "kv_transfer_params": {"transfer_id": tid, "do_remote_prefill": True,
                                             "mode": "write", **remote_of(p_info)}}

    async def post(url: str, b: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with s.post(url + "/v1/completions", json=b) as r:
            return r.status, await r.json()

    results = await asyncio.gather(
        post(p_url, p_body), post(d_url, d_body))
    return results[1]


def metric(url: str, name: str) -> float:
    """One summed gauge/counter value from /metrics."""
    text = requests.get(url + "/metrics", timeout=5).text
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def settled_metric(url: str, name: str, expected: float, timeout_s: float = 5.0) -> float:
    """``metric`` once it equals ``expected``, or its value at the deadline. The frontend's
    counters are the engine's last stats message, which can trail the response a peer got
    (P's final stats of a transfer race D's answer to the client) by a step."""
    deadline = time.monotonic() + timeout_s
    while (value := metric(url, name)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def wait_clean(url: str, timeout_s: float = 10.0) -> None:
    """Every block free and nothing held, within the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = requests.get(url + "/v1/kv_ledger", timeout=5).json()["ranks"]
        if all(r["free"] == r["total"] and r["held"] == 0 for r in last):
            return
        time.sleep(0.2)
    raise AssertionError(f"ledger not clean on {url}: {last}")
