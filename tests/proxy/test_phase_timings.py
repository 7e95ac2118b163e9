"""TTFT in phases through the proxy (disagg/common/timings.py): fake instances that sleep
through known phases, and one real 1P1D pair."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import openai
import pytest
from prom_text import value

from disagg.common.timings import PHASES
from proxy.config import TransferMode

PHASE_KEYS = [f"{name}_s" for name in PHASES]


async def _pair(fakes: Any, proxies: Any, fake_instance_module: Any, mode: str,
                **cfg: Any) -> Any:
    """P: 10 ms queue, 30 ms compute (WRITE: then 20 ms transfer). D: a queue of 10 ms plus a
    20 ms transfer (READ) or of 70 ms (WRITE: it waits for P's 60 ms), then 10 ms after its
    KV arrived; 5 ms compute."""
    behavior = fake_instance_module.Behavior
    p = await fakes(role="kv_producer", mode=mode, behavior=behavior(
        queue_s=0.01, compute_s=0.03, kv_transfer_s=0.02))
    d = await fakes(role="kv_consumer", mode=mode, behavior=behavior(
        queue_s=0.01 if mode == "read" else 0.07, compute_s=0.005, kv_transfer_s=0.02,
        after_kv_s=0.01))
    return await proxies(prefill_urls=(p.url,), decode_urls=(d.url,), mode=TransferMode(mode),
                         **cfg)


async def _ask(http: aiohttp.ClientSession, url: str, body: dict[str, Any]
               ) -> tuple[float, list[dict[str, Any]]]:
    """Send; the client's own TTFT (first token event, or the whole answer) and the JSON
    objects answered (one, or each stream event)."""
    start = time.monotonic()
    async with http.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        if not body.get("stream"):
            data = await resp.json()
            return time.monotonic() - start, [data]
        ttft, events = None, []
        async for line in resp.content:
            if line.startswith(b"data: {"):
                ttft = ttft or time.monotonic() - start
                events.append(json.loads(line[6:]))
        assert ttft is not None
        return ttft, events


def _check_tiling(t: dict[str, Any], client_ttft_s: float) -> None:
    """Every phase present, none negative, their sum the proxy's TTFT within 5%, and that
    TTFT no more than the client saw."""
    assert all(t[k] is not None and t[k] >= -1e-3 for k in PHASE_KEYS), t
    assert sum(t[k] for k in PHASE_KEYS) == pytest.approx(t["ttft_s"], rel=0.05)
    assert t["ttft_s"] <= client_ttft_s


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["read", "write"])
async def test_phases_sum_to_ttft(fakes: Any, proxies: Any, fake_instance_module: Any,
                                  http: Any, mode: str, stream: bool) -> None:
    proxy = await _pair(fakes, proxies, fake_instance_module, mode)
    body = {"prompt": "hello", "max_tokens": 3, "stream": stream, "disagg_timings": True}
    client_ttft, objs = await _ask(http, proxy.url, body)
    carrying = [o for o in objs if "disagg_timings" in o]
    assert len(carrying) == 1 and carrying[0] is objs[-1]  # one object, in the last chunk
    assert "kv_transfer_params" not in objs[-1]
    t = carrying[0]["disagg_timings"]
    assert t["mode"] == mode and t["prefill"] is not None and t["decode"] is not None
    _check_tiling(t, client_ttft)
    if mode == "read" and stream:  # the proxy streamed P's token: D is off the TTFT path
        assert t["prefill_compute_s"] >= 0.03
        assert t["kv_transfer_s"] == t["decode_admission_s"] == 0.0
        assert t["decode"]["kv_transfer_s"] >= 0.02  # D's own object still has its transfer
        return
    assert t["prefill_compute_s"] >= 0.03 and t["kv_transfer_s"] >= 0.02
    # (sleeps take at least as long as asked: lower bounds only, the machine may be busy)
    if mode == "read":  # D's queue without the transfer: 10 ms, then 10 ms after the KV
        assert t["decode_admission_s"] >= 0.02
    else:  # D's wait after write_done; P's queue is what is left of D's 80 ms wait
        assert t["decode_admission_s"] >= 0.01 and t["prefill_queue_s"] >= 0.01


async def test_only_asked_answers_carry_them_but_every_request_is_observed(
        fakes: Any, proxies: Any, fake_instance_module: Any, http: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    proxy = await _pair(fakes, proxies, fake_instance_module, "read",
                        log_request_phases_sample_rate=1.0)
    with caplog.at_level(logging.INFO, logger="proxy.timings"):
        for stream in (False, True):
            _, objs = await _ask(http, proxy.url, {"prompt": "hi", "max_tokens": 2,
                                                   "stream": stream})
            assert not any("disagg_timings" in o for o in objs)
    lines = [r.getMessage() for r in caplog.records if "request phases" in r.getMessage()]
    assert len(lines) == 2 and "transfer_id=xfer-" in lines[0] and "mode=read" in lines[0]
    assert "prefill_compute_ms=" in lines[0] and "_ms=-" not in lines[0]
    async with http.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    for name in PHASES:
        assert value(text, "disagg_proxy_request_phase_seconds_count", phase=name) == 2
    assert value(text, "disagg_proxy_time_to_first_token_seconds_count") == 2
    assert value(text, "disagg_proxy_request_phase_seconds_bucket", phase="kv_transfer",
                 le="+Inf") == 2


async def test_openai_client_and_body_validation(fakes: Any, proxies: Any,
                                                 fake_instance_module: Any, http: Any) -> None:
    proxy = await _pair(fakes, proxies, fake_instance_module, "read")
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0)
    try:
        done = await client.completions.create(model="builtin:tiny-llama", prompt="hi",
                                               max_tokens=2,
                                               extra_body={"disagg_timings": True})
        assert (done.model_extra or {})["disagg_timings"]["mode"] == "read"
        stream = await client.completions.create(model="builtin:tiny-llama", prompt="hi",
                                                 max_tokens=2, stream=True,
                                                 extra_body={"disagg_timings": True})
        chunks = [c async for c in stream]
        assert "disagg_timings" in (chunks[-1].model_extra or {})
    finally:
        await client.close()
    async with http.post(proxy.url + "/v1/completions",
                         json={"prompt": "hi", "disagg_timings": "yes"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "disagg_timings"


REAL = ["builtin:tiny-llama", "--kv-cache-memory-bytes", "16MiB", "--device", "cpu"]


def _kv_config(role: str) -> str:
    return json.dumps({"kv_connector": "PDConnector", "kv_role": role,
                       "kv_connector_extra_config": {"transport": "tcp", "mode": "read"}})


async def _remote(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/instance_info") as resp:
        i = await resp.json()
    return {"remote_engine_id": i["engine_id"], "remote_host": i["kv_host"],
            "remote_handshake_port": i["kv_handshake_port"],
            "remote_notify_port": i["kv_notify_port"]}


async def _write_direct(http: aiohttp.ClientSession, p_url: str, d_url: str,
                        body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One WRITE request sent to D, then to P (the proxy sends both at once); both answers."""
    common = {"transfer_id": "timings-write", "mode": "write"}
    p_body = {**body, "max_tokens": 1, "kv_transfer_params": {
        **common, "do_remote_decode": True, **await _remote(http, d_url)}}
    d_body = {**body, "kv_transfer_params": {
        **common, "do_remote_prefill": True, **await _remote(http, p_url)}}

    async def post(url: str, b: dict[str, Any]) -> dict[str, Any]:
        async with http.post(url + "/v1/completions", json=b) as resp:
            assert resp.status == 200, await resp.text()
            return dict(await resp.json())

    # D first, P a moment later: D's wait then covers all of P's time (sent at once, P could
    # be received first under load and D's queue be shorter than P's compute by the skew)
    d_task = asyncio.create_task(post(d_url, d_body))
    await asyncio.sleep(0.05)
    p_answer = await post(p_url, p_body)
    return p_answer, await d_task


async def test_real_1p1d_read_through_the_proxy_and_write_direct(
        instance_factory: Any, proxies: Any, http: Any) -> None:
    p, d = instance_factory.many([*REAL, "--kv-transfer-config", _kv_config("kv_producer")],
                                 [*REAL, "--kv-transfer-config", _kv_config("kv_consumer")])
    recompute = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,),
                              mode=TransferMode.READ, first_token_from_prefill=False)
    body = {"prompt": "The quick brown fox jumps over the lazy dog. " * 4, "max_tokens": 4,
            "disagg_timings": True}
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    client_ttft, events = await _ask(http, recompute.url, {**body, **stream})
    t = events[-1]["disagg_timings"]
    _check_tiling(t, client_ttft)
    assert t["kv_transfer_s"] > 0 and t["kv_transfer_s"] == t["decode"]["kv_transfer_s"]
    assert t["prefill"]["kv_transfer_s"] is None and t["prefill_compute_s"] > 0
    # the first token from the prefill: D streams it on arrival, the KV moves after it
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,), mode=TransferMode.READ)
    client_ttft, events = await _ask(http, proxy.url, {
        **body, "prompt": "Another prompt, so that nothing is cached. " * 4, **stream})
    t = events[-1]["disagg_timings"]
    _check_tiling(t, client_ttft)
    assert not t["kv_transfer_s"] and t["decode"]["compute_s"] == 0
    # WRITE (the request's mode overrides the instances'): P moves the KV and reports it;
    # D's wait covers P's queue, compute and transfer (less the skew of their arrivals)
    p_answer, d_answer = await _write_direct(http, p.url, d.url, body)
    pt, dt = p_answer["disagg_timings"], d_answer["disagg_timings"]
    assert pt["kv_transfer_s"] is not None and dt["kv_transfer_s"] is None
    assert pt["kv_to_scheduled_s"] is None
    # D streams P's first_token before the KV lands (nothing to schedule yet), or, when
    # write_done came first, after it: then its wait covers P's compute and transfer
    if dt["kv_to_scheduled_s"] is not None:
        assert dt["queue_s"] >= pt["compute_s"] + pt["kv_transfer_s"] + dt["kv_to_scheduled_s"]
    else:
        assert dt["queue_s"] >= pt["compute_s"] and dt["compute_s"] == 0
    for url in (p.url, d.url):  # one transfer each: D read one, P wrote one
        async with http.get(url + "/metrics") as resp:
            text = await resp.text()
        assert value(text, "disagg_request_phase_seconds_count", phase="kv_transfer") == 1
        assert value(text, "disagg_request_phase_seconds_bucket", phase="compute",
                     le="0.005") is not None
