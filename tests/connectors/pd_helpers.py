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


# ---- raw control-plane access (fuzz and regression tests) --------------------------------
def engine_core(server_pid: int) -> Any:
    """The engine-core process (a psutil.Process) of a single-rank instance: the child of its
    API server that multiprocessing spawned (not the resource tracker)."""
    import psutil

    kids = [c for c in psutil.Process(server_pid).children()
            if "spawn_main" in " ".join(c.cmdline())]
    assert len(kids) == 1, kids
    return kids[0]


def compatible_metadata(i: dict[str, Any], engine_id: str, epoch: int, *,
                        host: str = "127.0.0.1", handshake_port: int = 1,
                        notify_port: int = 1) -> Any:
    """EngineMetadata that an instance started with ``BASE`` (tiny-llama, CPU, float32, tcp)
    accepts from a peer: what another such instance would send, under any identity. Built by
    the connector's own build_metadata, so it tracks the real compatibility hash."""
    from types import SimpleNamespace

    import torch

    from connectors.pd_metadata import build_metadata
    from disagg.models.loader import resolve_arch

    arch = resolve_arch("builtin:tiny-llama")
    engine = SimpleNamespace(arch=arch,
                             cfg=SimpleNamespace(cache=SimpleNamespace(block_size=i["block_size"])))
    control = SimpleNamespace(host=host, handshake_port=handshake_port, notify_port=notify_port)
    block_bytes = arch.num_layers * 2 * i["block_size"] * arch.num_kv_heads * arch.head_dim * 4
    worker = SimpleNamespace(transport=SimpleNamespace(name="tcp"), descriptor=lambda: b"",
                             descriptors=lambda: [b""], tp_size=1, block_bytes=block_bytes)
    kv_cache = torch.empty((i["num_gpu_blocks"], 0), dtype=torch.float32)
    return build_metadata(engine, kv_cache, engine_id, epoch, control, worker)


def handshake(host: str, port: int, meta: Any, timeout_s: float = 5.0) -> Any:
    """Send one HandshakeRequest with ``meta`` over a fresh REQ socket; the decoded
    HandshakeResponse (AssertionError if none comes within the deadline)."""
    import zmq

    from connectors.protocol import CONTROL_VERSION, HandshakeRequest, encoder, hello_ack_decoder

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.connect(f"tcp://{host}:{port}")
        sock.send(encoder.encode(HandshakeRequest(version=CONTROL_VERSION, metadata=meta)))
        assert sock.poll(int(timeout_s * 1000)), f"no handshake reply from {host}:{port}"
        return hello_ack_decoder.decode(sock.recv())
    finally:
        sock.close(linger=0)
        ctx.term()


def push_frames(host: str, port: int, frames: list[bytes], linger_s: float = 5.0) -> None:
    """Send each frame as one message to a PULL socket (waits, bounded, until they left)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
    sock.setsockopt(zmq.SNDHWM, 0)
    try:
        sock.connect(f"tcp://{host}:{port}")
        for frame in frames:
            sock.send(frame, 0, copy=len(frame) < 1 << 16)
    finally:
        sock.close()
        ctx.term()


def metric_at_least(url: str, name: str, value: float, timeout_s: float = 10.0) -> float:
    """``metric`` once it reaches ``value``, or its value at the deadline (/metrics shows the
    engine's last stats message, at least one a second)."""
    deadline = time.monotonic() + timeout_s
    while (got := metric(url, name)) < value and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def alive(inst: Any) -> bool:
    """The instance's server process runs and its /health answers 200."""
    if inst.proc.poll() is not None:
        return False
    try:
        return bool(requests.get(inst.url + "/health", timeout=5).status_code == 200)
    except requests.RequestException:
        return False


# ---- engines in this process (no HTTP) ------------------------------------------------------
def pd_engine(role: str, mode: str, *, async_scheduling: bool = True,
              kv_cache_memory_bytes: int = 4 * 2**20, **options: Any) -> Any:
    """A tiny-llama EngineCore on the CPU with the PD connector over loopback TCP (prefix
    caching off, max_model_len 256); ``options`` go to kv_connector_extra_config."""
    from disagg.common.config import (
        CacheConfig,
        EngineConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
    )
    from disagg.engine.engine_core import EngineCore

    return EngineCore(EngineConfig(
        model=ModelConfig(model="builtin:tiny-llama", served_model_name="m", device="cpu",
                          max_model_len=256),
        cache=CacheConfig(block_size=16, kv_cache_memory_bytes=kv_cache_memory_bytes,
                          enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=8, async_scheduling=async_scheduling),
        kv_transfer=KVTransferConfig(
            kv_connector="PDConnector", kv_role=role, kv_connector_extra_config={
                "transport": "tcp", "mode": mode, "host": "127.0.0.1", **options})))


def engine_remote(engine: Any) -> dict[str, Any]:
    """An in-process engine's connector address as kv_transfer_params fields."""
    m = engine.connector.metadata
    return {"remote_engine_id": m.engine_id, "remote_host": m.host,
            "remote_handshake_port": m.handshake_port, "remote_notify_port": m.notify_port}
