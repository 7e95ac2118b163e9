"""Real `disagg serve` processes: ready handshake, admission, streaming, aborts, ledger."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import aiohttp
import pytest
import requests  # type: ignore[import-untyped]
from prom_text import value
from support import MALFORMED_HTTP, assert_malformed_answer, raw_http

from disagg.common.block_hash import model_seed

TINY = ["builtin:tiny-llama", "--kv-cache-memory-bytes", "32MiB", "--device", "cpu"]


def kv_free_total(url: str) -> tuple[float, float]:
    text = requests.get(url + "/metrics", timeout=5).text
    free = re.search(r"^disagg_kv_blocks_free\S* (\S+)$", text, re.M)
    total = re.search(r"^disagg_kv_blocks_total\S* (\S+)$", text, re.M)
    assert free is not None and total is not None
    return float(free.group(1)), float(total.group(1))


def wait_all_free(url: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free, total = kv_free_total(url)
        if free == total:
            ledger = requests.get(url + "/v1/kv_ledger", timeout=5).json()["ranks"]
            assert all(r["free"] == r["total"] and r["held"] == 0 for r in ledger)
            return
        time.sleep(0.2)
    raise AssertionError(f"blocks not all free: {kv_free_total(url)}")


def test_autofit_synced_to_frontend_and_rejects_long_prompt(instance_factory) -> None:
    inst = instance_factory([*TINY, "--num-gpu-blocks-override", "8", "--max-model-len", "auto"])
    models = requests.get(inst.url + "/v1/models", timeout=5).json()
    fitted = models["data"][0]["max_model_len"]
    assert fitted == 8 * 16  # <= override x block_size, below the model's 4096
    t0 = time.monotonic()
    r = requests.post(inst.url + "/v1/completions",
                      json={"prompt": "x" * 200, "max_tokens": 4}, timeout=5)
    assert r.status_code == 400 and time.monotonic() - t0 < 1.0
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and str(fitted) in err["message"]
    ok = requests.post(inst.url + "/v1/completions",
                       json={"prompt": "hello", "max_tokens": 4}, timeout=10)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_fixed_length_not_fitting_override_fails_startup(instance_factory) -> None:
    inst = instance_factory([*TINY, "--num-gpu-blocks-override", "4", "--max-model-len", "1000"],
                            expect_ready=False)
    assert inst.proc.wait(30) == 2
    log = inst.log()
    assert "max_model_len 1000 needs" in log and "largest max_model_len that fits is 64" in log
    assert "Traceback" not in log


def test_engine_block_size_reaches_frontend_metrics(instance_factory) -> None:
    inst = instance_factory([*TINY, "--block-size", "24",  # engine aligns to 32
                             "--served-model-name", "first", "second"])
    text = requests.get(inst.url + "/metrics", timeout=5).text
    assert 'block_size="32"' in text
    info = requests.get(inst.url + "/instance_info", timeout=5).json()
    assert info["block_size"] == 32
    assert (info["model"], info["model_aliases"]) == ("first", ["second"])  # for the proxy
    assert info["hash_seed"] == model_seed("builtin:tiny-llama")  # what the engine hashes with


def test_user_errors_are_openai_style(instance_factory) -> None:
    inst = instance_factory(TINY)
    cases = [b"{bad json", b'{"prompt": 5}', b'{"prompt": []}', b'{"prompt": "a", "n": 17}',
             b'{"prompt": "a", "model": "other"}', b'{"prompt": "a", "max_tokens": 0}',
             b'{"prompt": "a", "temperature": -1}', b""]
    for body in cases:
        r = requests.post(inst.url + "/v1/completions", data=body, timeout=5)
        assert 400 <= r.status_code < 500, (body, r.status_code)
        assert r.json()["error"]["message"], body
    r = requests.post(inst.url + "/v1/chat/completions", json={"messages": []}, timeout=5)
    assert r.status_code == 400
    for case, data in MALFORMED_HTTP.items():  # refused by aiohttp's parser, before any route
        answer = raw_http(inst.url, data)
        assert_malformed_answer(*answer), case


async def _stream_one(session: aiohttp.ClientSession, url: str, i: int) -> int:
    body = {"prompt": f"request {i}", "max_tokens": 8, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: ") and b"[DONE]" not in line:
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return tokens


def test_200_concurrent_streams_complete_and_free_blocks(instance_factory) -> None:
    inst = instance_factory([*TINY, "--max-num-seqs", "128"])

    async def run() -> list[int]:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(limit=0)) as s:
            return await asyncio.gather(*(_stream_one(s, inst.url, i) for i in range(200)))

    assert asyncio.run(run()) == [8] * 200
    wait_all_free(inst.url)


def test_client_disconnect_aborts_and_frees(instance_factory) -> None:
    inst = instance_factory(TINY)

    async def run() -> None:
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "long one", "max_tokens": 3000, "stream": True,
                    "ignore_eos": True}
            async with s.post(inst.url + "/v1/completions", json=body) as resp:
                await resp.content.readline()  # first event arrived: generation is running
        # leaving the block closes the connection mid-stream

    for _ in range(3):
        asyncio.run(run())
    wait_all_free(inst.url, timeout_s=5)
    text = requests.get(inst.url + "/metrics", timeout=5).text
    assert value(text, "disagg_request_success_total", finished_reason="abort") == 3
    # a client leaving is routine (a proxy closes its side at [DONE]): no traceback
    assert "Traceback" not in inst.log() and "Error handling request" not in inst.log()


def test_engine_death_stops_the_server(instance_factory) -> None:
    import psutil

    inst = instance_factory(TINY)
    children = psutil.Process(inst.proc.pid).children(recursive=True)
    engines = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    assert engines, "expected an engine-core child process"
    engines[0].kill()
    assert inst.proc.wait(15) == 1
    assert "died" in inst.log()


@pytest.mark.parametrize("chat", [False, True])
def test_openai_client_works(instance_factory, chat: bool) -> None:
    import openai

    inst = instance_factory(TINY)
    client = openai.OpenAI(base_url=inst.url + "/v1", api_key="none")
    if chat:
        out = client.chat.completions.create(model="builtin:tiny-llama", max_tokens=5,
                                             messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].message.content is not None
        stream = client.chat.completions.create(model="builtin:tiny-llama", max_tokens=5,
                                                messages=[{"role": "user", "content": "hi"}],
                                                stream=True)
        assert sum(1 for _ in stream) >= 1
    else:
        comp = client.completions.create(model="builtin:tiny-llama", prompt="hi", max_tokens=5,
                                         temperature=0, logprobs=2)
        assert comp.usage is not None and comp.usage.completion_tokens == 5
        logprobs = comp.choices[0].logprobs
        assert logprobs is not None and len(logprobs.token_logprobs or []) == 5


def test_kv_params_key_flag_guards_params_and_aborts(instance_factory) -> None:
    inst = instance_factory([*TINY, "--kv-params-key", "s3cret"])
    abort = {"transfer_id": "xfer-1"}
    r = requests.post(inst.url + "/v1/kv_transfer/abort", json=abort, timeout=5)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = requests.post(inst.url + "/v1/kv_transfer/abort", json=abort, timeout=5,
                      headers={"X-Disagg-KV-Key": "s3cret"})
    assert r.status_code == 200 and r.json() == {"transfer_id": "xfer-1", "found": False}
    body: dict[str, Any] = {"prompt": "hi", "max_tokens": 1, "kv_transfer_params": {
        "transfer_id": "xfer-2", "do_remote_decode": True}}
    r = requests.post(inst.url + "/v1/completions", json=body, timeout=10)
    assert r.status_code == 401
    r = requests.post(inst.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                      timeout=10)
    assert r.status_code == 200  # a plain request needs no key


def test_user_errors_never_reach_the_engine_as_500s(instance_factory) -> None:
    inst = instance_factory(TINY)
    cases: list[dict[str, Any]] = [
             {"prompt": "a", "seed": 2**64}, {"prompt": "a", "stop_token_ids": [2**70]},
             {"prompt": [2**64]}, {"prompt": "a", "top_k": -5},
             {"prompt": "a", "max_tokens": 2**65}]
    for body in cases:
        r = requests.post(inst.url + "/v1/completions", json=body, timeout=5)
        assert r.status_code == 400 and r.json()["error"]["message"], (body, r.text)
    r = requests.post(inst.url + "/v1/chat/completions", timeout=5, json={
        "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "max_completion_tokens must be at least 1"
    r = requests.post(inst.url + "/v1/completions", timeout=30,
                      json={"prompt": "a", "max_tokens": 2, "seed": -(2**63)})
    assert r.status_code == 200  # the whole signed 64-bit range reaches the sampler


def test_cache_salt_separates_prefix_caches_and_usage_reports_hits(instance_factory) -> None:
    import openai

    inst = instance_factory(TINY)
    client = openai.OpenAI(base_url=inst.url + "/v1", api_key="none")
    prompt = "a system prompt many turns share, " * 3  # 105 byte tokens: 6 full blocks of 16

    def cached(salt: str | None = None, stream: bool = False) -> int:
        extra = {} if salt is None else {"cache_salt": salt}
        if stream:
            chunks = list(client.completions.create(
                model="builtin:tiny-llama", prompt=prompt, max_tokens=2, stream=True,
                stream_options={"include_usage": True}, extra_body=extra))
            usage = chunks[-1].usage
        else:
            usage = client.completions.create(model="builtin:tiny-llama", prompt=prompt,
                                              max_tokens=2, extra_body=extra).usage
        assert usage is not None and usage.prompt_tokens_details is not None
        return usage.prompt_tokens_details.cached_tokens or 0

    assert cached() == 0  # cold
    assert cached() == 96  # every full block but the one holding the last prompt token
    assert cached("tenant-a") == 0  # a salt roots its own chain: no hit on unsalted blocks
    assert cached("tenant-a", stream=True) == 96
    assert cached("tenant-b") == 0
    for bad in ("", "x" * 1025, 7):
        r = requests.post(inst.url + "/v1/completions",
                          json={"prompt": "hi", "cache_salt": bad}, timeout=5)
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", bad
    wait_all_free(inst.url)
