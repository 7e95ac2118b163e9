"""Fuzz the proxy's HTTP server: no user input gets a 5xx, a traceback or a hang.

A few hundred random bodies per endpoint (tests/disagg/fuzz_bodies.py) through a proxy in front
of a fake prefill and a fake decode instance; bodies the proxy accepts are routed for real.
"""

from __future__ import annotations

import collections
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from disagg.common.openai_api import ChatCompletionRequest, CompletionRequest
from proxy.config import TransferMode


def _load_fuzz_bodies() -> Any:
    name = "disagg_tests_fuzz_bodies"  # by path: tests/ folders are not packages
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "disagg" / "fuzz_bodies.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fuzz = _load_fuzz_bodies()
NUM_CASES = 250
ADMIN_KEY = "adm"
ENDPOINTS = {
    ("POST", "/v1/completions"): ({"prompt": "hello", "max_tokens": 2},
                                  CompletionRequest.__struct_fields__),
    ("POST", "/v1/chat/completions"): ({"messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 2},
                                       ChatCompletionRequest.__struct_fields__),
    # Unknown URLs are 404s; no random body can name a live instance to remove or drain.
    ("DELETE", "/admin/instances"): ({"url": "http://127.0.0.1:9"}, ("url", "pool")),
    ("POST", "/admin/instances/drain"): ({"url": "http://127.0.0.1:9"}, ("url",)),
}


async def _send(http: aiohttp.ClientSession, method: str, url: str, case: Any) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    if case.content_type:
        headers["Content-Type"] = case.content_type
    async with http.request(method, url, data=case.body, headers=headers) as resp:
        return resp.status, await resp.read()


@pytest.mark.parametrize(("method", "path"), list(ENDPOINTS))
async def test_random_bodies_never_get_a_5xx(fakes: Any, proxies: Any, http: Any, method: str,
                                             path: str) -> None:
    p = await fakes(role="kv_producer", mode="read", max_model_len=256)
    d = await fakes(role="kv_consumer", mode="read", max_model_len=256)
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,), mode=TransferMode.READ,
                          admin_key=ADMIN_KEY)
    base, fields = ENDPOINTS[(method, path)]
    fuzzer = fuzz.BodyFuzzer(seed=sum(map(ord, method + path)), base=base, fields=fields)
    statuses: collections.Counter[int] = collections.Counter()
    started_s = time.monotonic()
    for i in range(NUM_CASES):
        case = fuzzer.case()
        status, body = await _send(http, method, proxy.url + path, case)
        fuzz.assert_openai_error(status, body, (i, case.kind, case.body[:200]))
        statuses[status] += 1
    assert statuses[400] >= NUM_CASES // 3, statuses
    assert time.monotonic() - started_s < 20.0
    if path.startswith("/v1/"):
        assert statuses[200] >= 10, statuses  # accepted bodies were routed and answered
        assert len(d.requests) == statuses[200]
    ok = fuzz.FuzzCase(fuzz.msgspec.json.encode(ENDPOINTS[("POST", "/v1/completions")][0]),
                       "application/json", "valid")
    assert (await _send(http, "POST", proxy.url + "/v1/completions", ok))[0] == 200
