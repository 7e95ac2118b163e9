"""The sampling fields at the instance's edge: penalties, min_p, logit_bias and n reach the
engine typed and bounded; anything out of range is a 400 naming the field (over a fake
engine, as test_openai_api.py)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from disagg.common.openai_api import CompletionRequest, check_request, logit_bias_pairs
from disagg.server.api_server import ENGINE

OK_COMPLETION = {"prompt": "hello", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
READ_PARAMS = {"transfer_id": "xfer-1", "do_remote_decode": True, "mode": "read"}


async def _post(client: Any, path: str, body: Any) -> tuple[int, Any]:
    async with client.post(path, data=msgspec.json.encode(body)) as resp:
        return resp.status, await resp.json()


async def test_every_field_reaches_the_engine(instance_client: Any) -> None:
    client = await instance_client()
    body = {**OK_CHAT, "presence_penalty": 0.5, "frequency_penalty": -0.5,
            "repetition_penalty": 1.2, "min_p": 0.1, "logit_bias": {"65": 5, "10": -100},
            "best_of": 1}
    status, out = await _post(client, "/v1/chat/completions", body)
    assert status == 200, out
    sp = client.app[ENGINE].requests[-1].sampling_params
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, sp.min_p) == \
        (0.5, -0.5, 1.2, 0.1)
    assert sp.logit_bias == ((10, -100.0), (65, 5.0))


async def test_omitted_and_null_fields_ask_for_nothing(instance_client: Any) -> None:
    client = await instance_client()
    body = {**OK_COMPLETION, "presence_penalty": None, "frequency_penalty": None,
            "repetition_penalty": None, "min_p": None, "logit_bias": None}
    status, out = await _post(client, "/v1/completions", body)
    assert status == 200, out
    sp = client.app[ENGINE].requests[-1].sampling_params
    assert not sp.processes_logits and sp.min_p == 0.0


@pytest.mark.parametrize(("field", "value", "words"), [
    ("presence_penalty", 2.5, "at most 2.0"),
    ("frequency_penalty", -2.01, "at least -2.0"),
    ("repetition_penalty", 0, "at least 0.01"),
    ("repetition_penalty", 101, "at most 100.0"),
    ("min_p", 1.5, "at most 1.0"),
    ("min_p", -0.1, "at least 0.0"),
    ("logit_bias", {"1": 101}, "each value of logit_bias must be at most 100.0"),
    ("logit_bias", {"x": 1}, "token ids"),
    ("logit_bias", {"-1": 1}, "token ids"),
    ("logit_bias", {"1.5": 1}, "token ids"),
    ("logit_bias", {"99999999999": 1}, "token ids"),
    ("logit_bias", {"320": 1}, "token id 320 is out of range [0, 320)"),
    ("logit_bias", {"7": 1, "07": 2}, "twice"),
    ("logit_bias", {str(i): 1 for i in range(301)}, "at most 300 entries"),
    ("logit_bias", [1, 2], "logit_bias"),
    ("n", 17, "at most 16"),
    ("n", 0, "at least 1"),
    ("best_of", 2, "best_of (2) must equal n (1)"),
])
async def test_out_of_range_values_are_a_400_naming_the_field(
        instance_client: Any, field: str, value: Any, words: str) -> None:
    client = await instance_client()
    status, out = await _post(client, "/v1/completions", {**OK_COMPLETION, field: value})
    assert status == 400, out
    assert out["error"]["param"] == field and words in out["error"]["message"], out
    assert client.app[ENGINE].requests == []


async def test_n_above_one_on_a_pd_leg_is_refused(instance_client: Any) -> None:
    client = await instance_client()
    body = {**OK_COMPLETION, "n": 2, "kv_transfer_params": READ_PARAMS}
    status, out = await _post(client, "/v1/completions", body)
    assert status == 400 and out["error"]["param"] == "n", out
    assert "P/D" in out["error"]["message"]
    # the proxy's check (no fan-out of its own yet) refuses it before routing
    with pytest.raises(Exception, match="n > 1"):
        check_request(msgspec.convert({**OK_COMPLETION, "n": 2}, CompletionRequest))


def test_logit_bias_pairs_are_sorted_token_ids() -> None:
    assert logit_bias_pairs({"9": -1, "0": 2.5}) == ((0, 2.5), (9, -1.0))
    assert logit_bias_pairs(None) == () and logit_bias_pairs({}) == ()


async def test_n_fans_out_to_one_engine_request_per_choice(instance_client: Any) -> None:
    client = await instance_client()
    status, out = await _post(client, "/v1/completions", {**OK_COMPLETION, "n": 3, "seed": 5})
    assert status == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["prompt_tokens"] == 6 and out["usage"]["completion_tokens"] == 6
    reqs = client.app[ENGINE].requests
    assert [r.request_id for r in reqs] == [f"{out['id']}-{i}" for i in range(3)]
    assert [r.sampling_params.seed for r in reqs] == [5, 6, 7]


async def test_n_streams_carry_their_choice_index(instance_client: Any) -> None:
    client = await instance_client()
    body = {**OK_CHAT, "n": 3, "stream": True, "stream_options": {"include_usage": True}}
    async with client.post("/v1/chat/completions", data=msgspec.json.encode(body)) as resp:
        assert resp.status == 200
        text = await resp.text()
    chunks = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: ") and "[DONE]" not in line]
    finished = {c["choices"][0]["index"] for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"]}
    assert finished == {0, 1, 2}
    assert chunks[-1]["usage"]["completion_tokens"] == 6


async def test_a_batch_of_prompts_answers_each_prompts_n_choices_in_order(
        instance_client: Any) -> None:
    """OpenAI's and vLLM's batched /v1/completions: prompt p's choice i is choice p * n + i,
    seeded seed + i like a lone request's; the usage counts every prompt once."""
    client = await instance_client()
    body = {"prompt": ["hello", [5, 6, 7]], "max_tokens": 2, "n": 2, "seed": 5,
            "return_token_ids": True}
    status, out = await _post(client, "/v1/completions", body)
    assert status == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["prompt_token_ids"][1] == [5, 6, 7]
    reqs = client.app[ENGINE].requests
    assert [list(r.prompt_token_ids) for r in reqs][2:] == [[5, 6, 7]] * 2
    assert [r.sampling_params.seed for r in reqs] == [5, 6, 5, 6]
    assert out["usage"]["prompt_tokens"] == len(out["prompt_token_ids"][0]) + 3
    assert out["usage"]["completion_tokens"] == 8
    streamed = {**body, "stream": True, "n": 1}
    async with client.post("/v1/completions", data=msgspec.json.encode(streamed)) as resp:
        text = await resp.text()
    indexes = {c["index"] for line in text.splitlines() if line.startswith("data: {")
               for c in json.loads(line[6:])["choices"]}
    assert resp.status == 200 and indexes == {0, 1}


@pytest.mark.parametrize(("prompt", "says"), [
    ([["a"], "b"], "each prompt of a batch"), (["a", []], "empty"),
    (["x"] * 65, "over this server's limit"), (["a", [1, -1]], "out of range")])
async def test_bad_batches_are_a_400(instance_client: Any, prompt: Any, says: str) -> None:
    client = await instance_client()
    status, out = await _post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    assert status == 400 and says in out["error"]["message"], out
    status, out = await _post(client, "/v1/completions", {
        "prompt": ["a", "b"], "max_tokens": 2, "kv_transfer_params": READ_PARAMS})
    assert status == 400 and "one prompt" in out["error"]["message"], out


async def test_a_fan_out_past_the_token_limit_is_a_400(instance_client: Any) -> None:
    client = await instance_client()
    status, out = await _post(client, "/v1/completions", {
        "prompt": [[5] * 100] * 4, "n": 16, "max_tokens": 1})
    assert status == 200, out  # 6,400 tokens: under the limit
    status, out = await _post(client, "/v1/completions", {
        "prompt": [[5] * 1100] * 64, "n": 16, "max_tokens": 1})
    assert status == 400 and out["error"]["param"] == "n", out


async def test_a_null_max_tokens_fills_the_context(instance_client: Any) -> None:
    """``"max_tokens": null`` asks for what the context leaves (vLLM); absent, a completion
    gets 16."""
    client = await instance_client()
    status, out = await _post(client, "/v1/completions", {"prompt": "hello", "max_tokens": None})
    assert status == 200, out
    engine = client.app[ENGINE]
    req = engine.requests[-1]
    assert req.sampling_params.max_tokens == \
        engine.synced.max_model_len - len(req.prompt_token_ids)
    status, out = await _post(client, "/v1/completions", {"prompt": "hello"})
    assert status == 200 and engine.requests[-1].sampling_params.max_tokens == 16
