"""--api-key on an instance: /v1/* needs the Bearer key (401 with an OpenAI-style body
otherwise), /health, /metrics and /tokenize stay open, the official openai client works with
the key; the key may come from DISAGG_API_KEY or VLLM_API_KEY."""

from __future__ import annotations

import argparse
from typing import Any

import openai
import pytest

from disagg.common import envs
from disagg.common.auth import bearer_matches, needs_api_key

KEY = "sk-test-1234"


def test_bearer_and_paths() -> None:
    assert bearer_matches(f"Bearer {KEY}", KEY) and bearer_matches(f"bearer  {KEY} ", KEY)
    assert not bearer_matches(KEY, KEY) and not bearer_matches("Bearer other", KEY)
    assert not bearer_matches("Basic " + KEY, KEY) and not bearer_matches("", KEY)
    assert needs_api_key("/v1/completions") and needs_api_key("/v1")
    assert not any(needs_api_key(p) for p in ("/health", "/metrics", "/tokenize", "/v10"))


async def test_v1_needs_the_key_and_the_rest_stays_open(instance_client: Any) -> None:
    client = await instance_client(api_key=KEY)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        resp = await client.post("/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert resp.status == 401
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_api_key" and "Bearer" in error["message"]
        assert (await client.get("/v1/models", headers=headers)).status == 401
    for path in ("/health", "/metrics", "/version"):
        assert (await client.get(path)).status == 200, path
    assert (await client.post("/tokenize", json={"prompt": "hi"})).status == 200
    auth = {"Authorization": f"Bearer {KEY}"}
    resp = await client.post("/v1/completions", json={"prompt": "hi"}, headers=auth)
    assert resp.status == 200


async def test_openai_client_with_the_key(instance_client: Any) -> None:
    client = await instance_client(api_key=KEY)
    base_url = str(client.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0) as oai:
        chat = await oai.chat.completions.create(
            model="builtin:tiny-llama", messages=[{"role": "user", "content": "hi"}],
            max_tokens=2)
        assert chat.choices[0].message.content is not None
        stream = await oai.completions.create(model="builtin:tiny-llama", prompt="hi",
                                              max_tokens=2, stream=True)
        assert [c async for c in stream]
    async with openai.AsyncOpenAI(base_url=base_url, api_key="wrong", max_retries=0) as oai:
        with pytest.raises(openai.AuthenticationError):
            await oai.models.list()


def test_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISAGG_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert envs.api_key() is None
    monkeypatch.setenv("VLLM_API_KEY", "v")
    assert envs.api_key() == "v"
    monkeypatch.setenv("DISAGG_API_KEY", "d")
    assert envs.api_key() == "d"


def test_serve_flag_parses() -> None:
    from disagg.cli import build_parser

    args = build_parser().parse_args(["serve", "--api-key", KEY])
    assert isinstance(args, argparse.Namespace) and args.api_key == KEY
