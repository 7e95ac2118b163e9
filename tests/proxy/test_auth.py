"""disagg-proxy --api-key: clients' /v1/* requests need the Bearer key; /health, /metrics stay
open; the key also goes to the instances (which need not have one)."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from proxy.launcher import parse_args, proxy_config
from proxy.upstream import upstream_headers

KEY = "sk-proxy"


async def test_clients_need_the_key(fakes: Any, proxies: Any, http: Any) -> None:
    p = await fakes(role="kv_producer")
    d = await fakes(role="kv_consumer")
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,), api_key=KEY)
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}):
        async with http.post(proxy.url + "/v1/completions", json=body, headers=headers) as r:
            assert r.status == 401
            assert "Bearer" in (await r.json())["error"]["message"]
    assert not p.requests and not d.requests
    for path in ("/health", "/metrics"):
        async with http.get(proxy.url + path) as r:
            assert r.status == 200, path
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=KEY,
                                  max_retries=0) as client:
        completion = await client.completions.create(model="m", prompt="hi", max_tokens=2)
        assert completion.choices[0].text
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="wrong",
                                  max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.completions.create(model="m", prompt="hi", max_tokens=2)


def test_flag_env_and_upstream_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISAGG_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    urls = ["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"]
    assert proxy_config(parse_args(urls)).api_key is None
    assert proxy_config(parse_args([*urls, "--api-key", KEY])).api_key == KEY
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert proxy_config(parse_args(urls)).api_key == "from-env"
    assert upstream_headers(None, KEY) == {"Authorization": f"Bearer {KEY}"}
