"""P/D over real processes on loopback: equality with monolithic output, faults, load."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp
import pytest
import requests  # type: ignore[import-untyped]
from pd_helpers import (
    BASE,
    info,
    kv_config,
    metric,
    pd_request,
    remote_of,
    settled_metric,
    wait_clean,
)

from disagg.engine.kv_sizing import bytes_per_block
from disagg.models.loader import resolve_arch

MAX_MODEL_LEN = 256


def _nixl_ok() -> bool:
    try:
        import nixl  # noqa: F401
    except Exception:
        return False
    return True


def _prompts(block_size: int = 16) -> list[list[int]]:
    # 1 token, exactly one block, one block + 1, and close to max_model_len (with 8 new tokens)
    lens = [1, block_size, block_size + 1, MAX_MODEL_LEN - 8]
    return [[(7 * i + n) % 250 + 1 for i in range(n)] for n in lens]


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _session_run(fn: Any) -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                     connector=aiohttp.TCPConnector(limit=0)) as s:
        return await fn(s)


def _assert_pd_equals_monolithic(p: Any, d: Any, mono: Any, mode: str) -> None:
    """Every prompt of ``_prompts()`` through P then D gives the monolithic greedy tokens."""
    p_info, d_info = info(p.url), info(d.url)

    async def go(s: aiohttp.ClientSession) -> None:
        for prompt in _prompts():
            body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}
            async with s.post(mono.url + "/v1/completions", json=body) as r:
                expected = (await r.json())["choices"][0]["token_ids"]
            status, out = await pd_request(s, p.url, d.url, body, mode, p_info, d_info)
            assert status == 200, out
            assert out["choices"][0]["token_ids"] == expected, len(prompt)

    _run(_session_run(go))


NIXL = pytest.mark.skipif(not _nixl_ok(), reason="nixl is not installed")


@pytest.mark.parametrize(("mode", "transport"), [
    ("read", "tcp"), ("write", "tcp"), pytest.param("read", "nixl", marks=NIXL),
    # tests/proxy/test_e2e.py runs WRITE over nixl through the proxy by default
    pytest.param("write", "nixl", marks=[NIXL, pytest.mark.slow])])
def test_pd_equals_monolithic(instance_factory, transport: str, mode: str) -> None:
    common = [*BASE, "--max-model-len", str(MAX_MODEL_LEN)]
    p, d, mono = instance_factory.many(
        [*common, "--kv-transfer-config", kv_config("kv_producer", mode, transport)],
        [*common, "--kv-transfer-config", kv_config("kv_consumer", mode, transport)], common)
    _assert_pd_equals_monolithic(p, d, mono, mode)
    moved_side = d.url if mode == "read" else p.url
    assert metric(moved_side, "disagg_kv_connector_bytes_moved_total") > 0
    assert metric(moved_side, "disagg_kv_connector_transfers_done_total") >= 3
    wait_clean(p.url)
    wait_clean(d.url)


def test_pd_layerwise_write_equals_monolithic(instance_factory) -> None:
    """tcp WRITE streaming each layer; P chunks its prefill every 24 tokens, so chunks end both
    inside a block and on a block boundary. Each transferred block is written exactly once.
    P waits for the decode's blocks (early_start off): with early start a fast P can finish a
    short prompt before they arrive and send it whole, with no layer post to count."""
    common = [*BASE, "--max-model-len", str(MAX_MODEL_LEN)]
    p, d, mono = instance_factory.many(
        [*common, "--max-num-batched-tokens", "24", "--kv-transfer-config",
         kv_config("kv_producer", "write", layerwise=True, early_start=False)],
        [*common, "--kv-transfer-config", kv_config("kv_consumer", "write", layerwise=True)],
        common)
    _assert_pd_equals_monolithic(p, d, mono, "write")
    a = resolve_arch("builtin:tiny-llama")
    block_bytes = bytes_per_block(a.num_layers, 16, a.num_kv_heads, a.head_dim, 4)
    # the decode's blocks: ceil((n - 1) / 16) per prompt, as the whole-prompt WRITE moves
    num_blocks = sum(-(-(len(prompt) - 1) // 16) for prompt in _prompts())
    expected_bytes = num_blocks * block_bytes
    assert settled_metric(p.url, "disagg_kv_connector_bytes_moved_total",
                          expected_bytes) == expected_bytes
    posts = metric(p.url, "disagg_kv_connector_layer_posts_total")
    assert posts > 0 and posts % a.num_layers == 0
    assert settled_metric(p.url, "disagg_kv_connector_transfers_done_total",
                          len(_prompts())) == len(_prompts())
    wait_clean(p.url)
    wait_clean(d.url)


FAST: dict[str, Any] = {"transfer_timeout": 3, "defer_timeout": 3, "lease_timeout": 2,
        "heartbeat_interval": 0.5}


def _pair(instance_factory, mode: str, p_extra: list[str] | None = None,
          d_extra: list[str] | None = None, **extra: Any) -> tuple[Any, Any]:
    p, d = instance_factory.many(
        [*BASE, *(p_extra or []), "--kv-transfer-config",
         kv_config("kv_producer", mode, **FAST, **extra)],
        [*BASE, *(d_extra or []), "--kv-transfer-config",
         kv_config("kv_consumer", mode, **FAST, **extra)])
    return p, d


BODY: dict[str, Any] = {"prompt": "fault injection prompt " * 4, "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


def _still_serves(url: str) -> None:
    r = requests.post(url + "/v1/completions", json={"prompt": "ok?", "max_tokens": 2},
                      timeout=30)
    assert r.status_code == 200


def test_write_decode_never_allocates_prefill_gives_up_after_defer_timeout(
        instance_factory) -> None:
    p, d = _pair(instance_factory, "write")
    body = {**BODY, "max_tokens": 1, "kv_transfer_params": {
        "transfer_id": "never-allocated", "do_remote_decode": True, "mode": "write",
        **remote_of(info(d.url))}}
    t0 = time.monotonic()
    r = requests.post(p.url + "/v1/completions", json=body, timeout=30)
    elapsed = time.monotonic() - t0
    # The prefill waits (holding no blocks) for remote_blocks, then expires the transfer.
    assert r.status_code >= 500 and "expired" in r.json()["error"]["message"]
    assert FAST["defer_timeout"] - 0.5 <= elapsed < FAST["defer_timeout"] + 5
    assert metric(p.url, "disagg_kv_connector_transfers_expired_total") == 1
    wait_clean(p.url)
    _still_serves(p.url)
    wait_clean(d.url)


def test_write_prefill_holds_then_writes_after_late_decode(instance_factory) -> None:
    """remote_blocks before the prefill request: kept as an early notification, then used."""
    p, d = _pair(instance_factory, "write")
    p_info, d_info = info(p.url), info(d.url)
    body = {**BODY, "return_token_ids": True}

    async def go(s: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
        d_task = asyncio.create_task(s.post(d.url + "/v1/completions", json={
            **body, "kv_transfer_params": {"transfer_id": "late", "do_remote_prefill": True,
                                           "mode": "write", **remote_of(p_info)}}))
        await asyncio.sleep(1.0)  # the decode allocated and announced its blocks first
        async with s.post(p.url + "/v1/completions", json={
                **body, "max_tokens": 1, "kv_transfer_params": {
                    "transfer_id": "late", "do_remote_decode": True, "mode": "write",
                    **remote_of(d_info)}}) as r:
            assert r.status == 200
        resp = await d_task
        return resp.status, await resp.json()

    status, out = _run(_session_run(go))
    assert status == 200, out
    expected = requests.post(d.url + "/v1/completions", json=body, timeout=30).json()
    assert out["choices"][0]["token_ids"] == expected["choices"][0]["token_ids"]
    wait_clean(p.url)
    wait_clean(d.url)


def test_read_prefill_killed_after_answering_decode_fails_cleanly(instance_factory) -> None:
    p, d = _pair(instance_factory, "read")
    tid = "prefill-dies"
    r = requests.post(p.url + "/v1/completions", json={**BODY, "max_tokens": 1,
                      "kv_transfer_params": {"transfer_id": tid, "do_remote_decode": True}},
                      timeout=30)
    params = {**r.json()["kv_transfer_params"], "do_remote_prefill": True}
    p.kill()
    t0 = time.monotonic()
    r = requests.post(d.url + "/v1/completions", json={**BODY, "kv_transfer_params": params},
                      timeout=60)
    elapsed = time.monotonic() - t0
    assert r.status_code >= 500
    message = r.json()["error"]["message"]
    assert "KV transfer failed" in message
    assert elapsed < FAST["transfer_timeout"] + 12  # handshake/transfer deadline, no hang
    wait_clean(d.url)
    _still_serves(d.url)


def test_decode_killed_mid_transfer_prefill_frees_by_expiry(instance_factory) -> None:
    p, d = _pair(instance_factory, "read")
    r = requests.post(p.url + "/v1/completions", json={**BODY, "max_tokens": 1,
                      "kv_transfer_params": {"transfer_id": "decode-dies",
                                             "do_remote_decode": True}}, timeout=30)
    params = {**r.json()["kv_transfer_params"], "do_remote_prefill": True}

    async def send_and_kill() -> None:
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(s.post(d.url + "/v1/completions",
                                              json={**BODY, "kv_transfer_params": params}))
            await asyncio.sleep(0.05)
            d.kill()
            try:
                await asyncio.wait_for(task, 10)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass

    asyncio.run(send_and_kill())
    wait_clean(p.url, timeout_s=15)
    _still_serves(p.url)


# a frozen (SIGSTOPped) peer in every mode is tests/connectors/test_pd_frozen.py's
@pytest.mark.parametrize("fault", ["kill", pytest.param("stop", marks=pytest.mark.slow)])
def test_write_layerwise_decode_dies_mid_stream_prefill_frees(instance_factory,
                                                              fault: str) -> None:
    """The decode crashes (SIGKILL: the layer writes fail) or hangs (SIGSTOP: they stay pending
    until the lease and transfer deadlines expire them) while the prefill streams its layers:
    the prefill frees every block, by failure or expiry, and keeps serving."""
    p, d = _pair(instance_factory, "write", p_extra=["--max-num-batched-tokens", "16"],
                 layerwise=True)
    p_info, d_info = info(p.url), info(d.url)
    warm = {**BODY, "max_tokens": 2}
    status, _ = _run(_session_run(lambda s: pd_request(s, p.url, d.url, warm, "write", p_info,
                                                       d_info)))
    assert status == 200  # the prefill now knows the decode (handshake, connections)
    posts_before = metric(p.url, "disagg_kv_connector_layer_posts_total")
    body = {**BODY, "prompt": "a long prompt streamed layer by layer " * 12}

    async def go(s: aiohttp.ClientSession) -> None:
        d_task = asyncio.create_task(s.post(d.url + "/v1/completions", json={
            **body, "kv_transfer_params": {"transfer_id": "dies", "do_remote_prefill": True,
                                           "mode": "write", **remote_of(p_info)}}))
        await asyncio.sleep(1.0)  # the decode allocated and announced its blocks
        os.killpg(d.proc.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        async with s.post(p.url + "/v1/completions", json={
                **body, "max_tokens": 1, "kv_transfer_params": {
                    "transfer_id": "dies", "do_remote_decode": True, "mode": "write",
                    **remote_of(d_info)}}) as r:
            await r.read()
        d_task.cancel()

    _run(_session_run(go))
    wait_clean(p.url, timeout_s=20)
    assert metric(p.url, "disagg_kv_connector_layer_posts_total") > posts_before
    gave_up = (metric(p.url, "disagg_kv_connector_transfers_failed_total")
               + metric(p.url, "disagg_kv_connector_transfers_expired_total"))
    assert gave_up == 1
    if fault == "stop":
        assert metric(p.url, "disagg_kv_connector_transfers_expired_total") == 1
    _still_serves(p.url)
    d.kill()


def test_unknown_and_malformed_notifications_are_counted(instance_factory) -> None:
    import zmq

    from connectors.protocol import Release, encoder

    p, _ = _pair(instance_factory, "read")
    i = info(p.url)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(f"tcp://{i['kv_host']}:{i['kv_notify_port']}")
    sock.send(b"\x00garbage")
    sock.send(encoder.encode(Release(transfer_id="no-such-transfer", engine_id="x", epoch=1,
                                     generation=1)))  # nobody this engine has handshaken
    sock.close()
    ctx.term()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (metric(p.url, "disagg_kv_connector_notifications_malformed_total") == 1
                and metric(p.url, "disagg_kv_connector_notifications_unidentified_total") == 1):
            break
        time.sleep(0.2)
    assert metric(p.url, "disagg_kv_connector_notifications_malformed_total") == 1
    assert metric(p.url, "disagg_kv_connector_notifications_unidentified_total") == 1
    _still_serves(p.url)


def test_incompatible_peer_is_refused_with_clear_error(instance_factory) -> None:
    p, d = _pair(instance_factory, "read", p_extra=["--block-size", "32"])
    r = requests.post(p.url + "/v1/completions", json={**BODY, "max_tokens": 1,
                      "kv_transfer_params": {"transfer_id": "mismatch",
                                             "do_remote_decode": True}}, timeout=30)
    params = {**r.json()["kv_transfer_params"], "do_remote_prefill": True}
    r = requests.post(d.url + "/v1/completions", json={**BODY, "kv_transfer_params": params},
                      timeout=30)
    assert r.status_code >= 500
    assert "block_size differs" in r.json()["error"]["message"]
    wait_clean(p.url, timeout_s=10)  # D told P the transfer failed
    wait_clean(d.url)
    assert metric(p.url, "disagg_kv_connector_handshakes_refused_total") == 1


def test_recompute_policy_prefills_locally(instance_factory) -> None:
    p, d = instance_factory.many(
        [*BASE, "--kv-transfer-config", kv_config("kv_producer", "read", **FAST)],
        [*BASE, "--kv-transfer-config", kv_config(
            "kv_consumer", "read", kv_load_failure_policy="recompute", **FAST)])
    body = {**BODY, "return_token_ids": True}
    expected = requests.post(d.url + "/v1/completions", json=body, timeout=30).json()
    r = requests.post(p.url + "/v1/completions", json={**body, "max_tokens": 1,
                      "kv_transfer_params": {"transfer_id": "rc", "do_remote_decode": True}},
                      timeout=30)
    params = {**r.json()["kv_transfer_params"], "do_remote_prefill": True}
    p.kill()
    r = requests.post(d.url + "/v1/completions", json={**body, "kv_transfer_params": params},
                      timeout=60)
    assert r.status_code == 200
    assert r.json()["choices"][0]["token_ids"] == expected["choices"][0]["token_ids"]
    wait_clean(d.url)


# WRITE at a full batch (256 running) by default; 512 in slow, and READ's high concurrency by
# default in tests/proxy/test_e2e.py's 1,000 streams
@pytest.mark.parametrize(("mode", "num"), [pytest.param("read", 512, marks=pytest.mark.slow),
                                           pytest.param("write", 512, marks=pytest.mark.slow),
                                           ("write", 256)])
def test_concurrent_requests_tcp(instance_factory, mode: str, num: int) -> None:
    args = ["--max-num-seqs", "256", "--kv-cache-memory-bytes", "64MiB"]
    p, d = instance_factory.many(
        [*BASE, *args, "--kv-transfer-config", kv_config("kv_producer", mode)],
        [*BASE, *args, "--kv-transfer-config", kv_config("kv_consumer", mode)])
    p_info, d_info = info(p.url), info(d.url)

    async def go(s: aiohttp.ClientSession) -> list[int]:
        async def one(i: int) -> int:
            body = {"prompt": f"concurrent request number {i} " * 3, "max_tokens": 4,
                    "ignore_eos": True}
            status, out = await pd_request(s, p.url, d.url, body, mode, p_info, d_info)
            assert status == 200, out
            return int(out["usage"]["completion_tokens"])

        return await asyncio.gather(*(one(i) for i in range(num)))

    t0 = time.monotonic()
    assert _run(_session_run(go)) == [4] * num
    assert time.monotonic() - t0 < 240
    wait_clean(p.url)
    wait_clean(d.url)
    assert metric(p.url, "disagg_kv_connector_transfers_failed_total") == 0
    assert os.path.exists(p.log_path)


def test_write_decode_gave_up_before_prefill_arrived_fails_fast(instance_factory) -> None:
    """remote_blocks then transfer_failed from the decode, before the prefill request comes:
    the prefill must not write into blocks the decode already freed."""
    p, d = _pair(instance_factory, "write")
    p_info, d_info = info(p.url), info(d.url)

    async def go(s: aiohttp.ClientSession) -> None:
        d_task = asyncio.create_task(s.post(d.url + "/v1/completions", json={
            **BODY, "kv_transfer_params": {"transfer_id": "gave-up", "do_remote_prefill": True,
                                           "mode": "write", **remote_of(p_info)}}))
        await asyncio.sleep(1.0)  # the decode allocated and announced its blocks
        async with s.post(d.url + "/v1/kv_transfer/abort",
                          json={"transfer_id": "gave-up"}) as r:
            assert r.status == 200
        resp = await d_task
        body = await resp.json()
        assert resp.status != 200 or body["choices"][0]["finish_reason"] == "abort"
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        async with s.post(p.url + "/v1/completions", json={
                **BODY, "max_tokens": 1, "kv_transfer_params": {
                    "transfer_id": "gave-up", "do_remote_decode": True, "mode": "write",
                    **remote_of(d_info)}}) as r:
            assert r.status >= 500
            assert "gave up" in (await r.json())["error"]["message"]
        assert time.monotonic() - t0 < FAST["defer_timeout"]  # failed at once, no expiry

    _run(_session_run(go))
    wait_clean(p.url)
    wait_clean(d.url)
