"""POST /tokenize and /detokenize: vLLM's shapes, the ids a generation request would prefill,
bounded and typed at the edge (400s with OpenAI-style bodies)."""

from __future__ import annotations

from typing import Any

import pytest

from disagg.common.tokenizer import BUILTIN_BOS_ID, ByteTokenizer

CHAT = [{"role": "user", "content": "hi"}]


async def test_tokenize_a_prompt_as_a_completion_would(instance_client: Any) -> None:
    client = await instance_client()
    resp = await client.post("/tokenize", json={"prompt": "hey"})
    assert resp.status == 200
    body = await resp.json()
    models = await (await client.get("/v1/models")).json()
    assert body == {"count": 4, "max_model_len": models["data"][0]["max_model_len"],
                    "tokens": [BUILTIN_BOS_ID, *b"hey"], "token_strs": None}
    resp = await client.post("/tokenize", json={"prompt": "hey", "add_special_tokens": False,
                                                "return_token_strs": True})
    body = await resp.json()
    assert body["tokens"] == list(b"hey") and body["token_strs"] == ["h", "e", "y"]


async def test_tokenize_messages_as_a_chat_would(instance_client: Any) -> None:
    client = await instance_client()
    body = await (await client.post("/tokenize", json={"messages": CHAT})).json()
    assert body["tokens"] == ByteTokenizer().chat_ids(CHAT)
    assert body["count"] == len(body["tokens"])


async def test_detokenize(instance_client: Any) -> None:
    client = await instance_client()
    resp = await client.post("/detokenize", json={"tokens": [BUILTIN_BOS_ID, *b"ok"],
                                                  "model": "builtin:tiny-llama"})
    assert resp.status == 200 and await resp.json() == {"prompt": "ok"}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages"),
    ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [2**31]}, "tokens"),
    ("/detokenize", {"tokens": [100_000]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {}, "tokens"),
])
async def test_bad_bodies_are_openai_errors(instance_client: Any, path: str,
                                            body: dict[str, Any], param: str) -> None:
    client = await instance_client()
    resp = await client.post(path, json=body)
    assert resp.status in (400, 404)
    error = (await resp.json())["error"]
    assert error["message"] and error["param"] == param


async def test_not_json_is_a_400(instance_client: Any) -> None:
    client = await instance_client()
    for path in ("/tokenize", "/detokenize"):
        resp = await client.post(path, data=b"{nope")
        assert resp.status == 400 and (await resp.json())["error"]["message"]
