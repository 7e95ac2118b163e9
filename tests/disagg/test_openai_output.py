"""What a vLLM client reads back: stop strings and stop tokens (text, finish_reason,
stop_reason, min_tokens, include_stop_str_in_output), the request counters, stream framing
(chat's role once, [DONE] after an error, continuous usage), completion logprobs' shape, null
fields, vLLM's prompt and chat options. The instance app over a scripted fake engine."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest
from prom_text import value

from disagg.common.protocol import EngineCoreOutput, TokenLogprob
from disagg.server.api_server import ENGINE
from disagg.server.detokenizer import CONTEXT_IDS, IncrementalDetokenizer

A, B, C, X, Y = (ord(ch) for ch in "abcXY")


def _out(ids: list[int], finish: str | None = None,
         lps: list[TokenLogprob] | None = None, error: str | None = None) -> EngineCoreOutput:
    return EngineCoreOutput("r", ids, finish, lps, error=error)


async def _post(client: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with client.post(path, data=msgspec.json.encode(body)) as resp:
        return resp.status, await resp.json()


async def _events(client: Any, path: str, body: dict[str, Any]) -> list[Any]:
    async with client.post(path, data=msgspec.json.encode({**body, "stream": True})) as resp:
        assert resp.status == 200, await resp.text()
        text = await resp.text()
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


async def _scripted(instance_client: Any, *outputs: EngineCoreOutput) -> Any:
    client = await instance_client()
    client.app[ENGINE].script = list(outputs)
    return client


COMPLETION = {"prompt": "hi", "max_tokens": 4}


async def test_a_stop_string_on_the_last_allowed_token_finishes_with_stop(
        instance_client: Any) -> None:
    client = await _scripted(instance_client, _out([A, B]), _out([X, Y], "length"))
    status, body = await _post(client, "/v1/completions", {**COMPLETION, "stop": ["XY"]})
    choice = body["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("ab", "stop", "XY")


@pytest.mark.parametrize(("include", "text"), [(False, "ab"), (True, "abXY")])
async def test_a_stop_string_ends_the_output_and_is_kept_only_when_asked(
        instance_client: Any, include: bool, text: str) -> None:
    client = await _scripted(instance_client, _out([A, B, X]), _out([Y, C]), _out([C], "length"))
    status, body = await _post(client, "/v1/completions", {
        **COMPLETION, "stop": ["XY"], "include_stop_str_in_output": include})
    choice = body["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (text, "stop")
    assert client.app[ENGINE].aborted  # the engine was still generating: aborted


@pytest.mark.parametrize(("include", "text"), [(False, "ab"), (True, "abc")])
async def test_a_stop_tokens_text_is_left_out_unless_asked(instance_client: Any, include: bool,
                                                           text: str) -> None:
    client = await _scripted(instance_client, _out([A, B]), _out([C], "stop"))
    status, body = await _post(client, "/v1/completions", {
        **COMPLETION, "stop_token_ids": [C], "include_stop_str_in_output": include})
    choice = body["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (text, "stop", C)
    assert body["usage"]["completion_tokens"] == 3  # the stop token is still an output token


async def test_stop_strings_count_only_after_min_tokens(instance_client: Any) -> None:
    client = await _scripted(instance_client, _out([A]), _out([B]), _out([A]),
                             _out([C], "length"))
    status, body = await _post(client, "/v1/completions", {
        **COMPLETION, "stop": ["a"], "min_tokens": 2})
    assert (body["choices"][0]["text"], body["choices"][0]["finish_reason"]) == ("ab", "stop")


async def test_a_request_ended_by_a_stop_string_counts_as_stop_not_abort(
        instance_client: Any) -> None:
    client = await _scripted(instance_client, _out([A, X]), _out([Y]), _out([C], "length"))
    await _post(client, "/v1/completions", {**COMPLETION, "stop": ["XY"]})
    async with client.get("/metrics") as resp:
        text = await resp.text()
    assert value(text, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(text, "vllm:request_success_total", finished_reason="abort") == 0
    assert value(text, "vllm:generation_tokens_total") == 3


async def test_the_tokens_of_an_aborted_request_count(instance_client: Any) -> None:
    """Token counters count as tokens are done (vLLM counts every step), not only requests
    that ran to their end: a client leaving mid-stream leaves its prompt and the tokens it got
    counted (the stats line showed no generation throughput during a long request)."""
    client = await _scripted(instance_client, _out([A]), _out([B]))  # never finishes
    async with client.post("/v1/completions",
                           data=msgspec.json.encode({**COMPLETION, "stream": True})) as resp:
        await resp.content.readline()
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # the server sees the client leave on its own time
        async with client.get("/metrics") as resp:
            text = await resp.text()
        if value(text, "vllm:request_success_total", finished_reason="abort") == 1:
            break
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    assert value(text, "vllm:generation_tokens_total") == 2
    assert value(text, "disagg_generation_tokens_total") == 2
    assert value(text, "disagg_prompt_tokens_total") == \
        len(client.app[ENGINE].requests[-1].prompt_token_ids)


@pytest.mark.parametrize("chat", [False, True])
async def test_a_stream_with_return_token_ids_names_the_prompt_ids_once(
        instance_client: Any, chat: bool) -> None:
    """As vLLM: a streamed answer with return_token_ids carries the prompt's ids in its
    first chunk (a completion choice's, a chat chunk's), every chunk its new tokens' ids."""
    client = await _scripted(instance_client, _out([A]), _out([B]), _out([C], "length"))
    body: dict[str, Any] = {"max_tokens": 4, "stream": True, "return_token_ids": True,
                            **({"messages": [{"role": "user", "content": "hi"}]} if chat
                               else {"prompt": "hi"})}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with client.post(path, data=msgspec.json.encode(body)) as resp:
        chunks = [json.loads(line[6:]) for line in (await resp.text()).splitlines()
                  if line.startswith("data: {")]
    prompt = client.app[ENGINE].requests[-1].prompt_token_ids
    holders = [c if chat else c["choices"][0] for c in chunks]
    assert [h.get("prompt_token_ids") for h in holders] == [prompt, None, None]
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[A], [B], [C]]


def test_the_window_decodes_as_the_whole_output() -> None:
    """Decoding a window per push gives the text decoding everything gives, multi-byte
    characters split across pushes included."""

    class Counting:
        def __init__(self) -> None:
            self.decoded = 0

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            self.decoded += len(ids)
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    tok = Counting()
    data = ("héllo wörld € " * 40).encode()
    detok = IncrementalDetokenizer(tok, ())  # type: ignore[arg-type]
    text = "".join(detok.push([b], final=i == len(data) - 1) for i, b in enumerate(data))
    assert text == data.decode()
    assert tok.decoded < 4 * (CONTEXT_IDS + 2) * len(data)  # linear: a window per token


async def test_a_chat_stream_names_the_role_once_and_ends_with_an_error_not_done(
        instance_client: Any) -> None:
    client = await _scripted(instance_client, _out([A]), _out([B]),
                             _out([], "error", error="boom"))
    events = await _events(client, "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}]})
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas == [{"role": "assistant", "content": "a"}, {"content": "b"}]
    assert events[-1]["error"]["message"] == "boom"  # no [DONE]: the answer is not whole


async def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(
        instance_client: Any) -> None:
    client = await _scripted(instance_client, _out([A]), _out([B]), _out([C], "length"))
    events = await _events(client, "/v1/completions", {
        **COMPLETION, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert [e["usage"]["completion_tokens"] for e in events[:-1]] == [1, 2, 3, 3]


async def test_completion_logprobs_have_text_offsets_and_the_sampled_token(
        instance_client: Any) -> None:
    lp = [TokenLogprob(-0.1, [(B, -0.05)]), TokenLogprob(-0.2, [(B, -0.2)])]
    client = await _scripted(instance_client, _out([A, B], "length", lp))
    status, body = await _post(client, "/v1/completions", {**COMPLETION, "logprobs": 1})
    lps = body["choices"][0]["logprobs"]
    assert lps["text_offset"] == [0, 1]
    assert lps["top_logprobs"] == [{"b": -0.05, "a": -0.1}, {"b": -0.2}]
    client.app[ENGINE].script = [_out([A, B], "length", lp)]
    status, body = await _post(client, "/v1/completions", {
        **COMPLETION, "logprobs": 1, "return_tokens_as_token_ids": True})
    assert body["choices"][0]["logprobs"]["tokens"] == [f"token_id:{A}", f"token_id:{B}"]


async def test_chat_logprobs_carry_bytes(instance_client: Any) -> None:
    client = await _scripted(instance_client,
                             _out([A], "length", [TokenLogprob(-0.1, [(A, -0.1)])]))
    status, body = await _post(client, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1})
    content = body["choices"][0]["logprobs"]["content"][0]
    assert content["bytes"] == [A] and content["top_logprobs"][0]["bytes"] == [A]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_null_fields_take_their_defaults(instance_client: Any, path: str) -> None:
    client = await instance_client()
    base: dict[str, Any] = (COMPLETION if "chat" not in path
                            else {"messages": [{"role": "user", "content": "hi"}]})
    nulls = {"n": None, "stream": None, "echo": None, "logprobs": None, "stop": None,
             "stream_options": None, "temperature": None, "max_tokens": None}
    status, body = await _post(client, path, {**base, **nulls})
    assert status == 200 and len(body["choices"]) == 1, body


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"tokenize": True}},
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"chat_template": "{{ messages }}"}, "chat_template"),
    ("/v1/completions", {"structured_outputs": {"json": {"type": "object"}}},
     "structured_outputs"),
    ("/v1/completions", {"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
    ("/v1/completions", {"bad_words": ["x"]}, "bad_words"),
    ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
])
async def test_what_cannot_be_honoured_is_a_400_naming_it(instance_client: Any, path: str,
                                                          extra: dict[str, Any],
                                                          param: str) -> None:
    client = await instance_client()
    base: dict[str, Any] = (COMPLETION if "chat" not in path
                            else {"messages": [{"role": "user", "content": "hi"}]})
    status, body = await _post(client, path, {**base, **extra})
    assert status == 400 and body["error"]["param"] == param, body
    assert client.app[ENGINE].requests == []


async def test_truncate_prompt_tokens_keeps_the_prompts_end(instance_client: Any) -> None:
    client = await instance_client()
    await _post(client, "/v1/completions", {**COMPLETION, "prompt": "abcdefgh",
                                            "truncate_prompt_tokens": 3})
    assert client.app[ENGINE].requests[-1].prompt_token_ids == [ord(ch) for ch in "fgh"]


async def test_chat_rendering_options_reach_the_template(instance_client: Any) -> None:
    client = await instance_client()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]

    async def prompt(**extra: Any) -> str:
        status, body = await _post(client, "/v1/chat/completions",
                                   {"messages": messages, **extra})
        assert status == 200, body
        ids = client.app[ENGINE].requests[-1].prompt_token_ids
        return bytes(i for i in ids if i < 256).decode()

    assert (await prompt()).endswith("Sure\n<|assistant|>\n")
    assert (await prompt(add_generation_prompt=False)).endswith("Sure\n")
    assert (await prompt(add_generation_prompt=False,
                         continue_final_message=True)).endswith("Sure")


async def test_an_empty_text_prompt_starts_from_bos_and_no_ids_is_a_400(
        instance_client: Any) -> None:
    """As vLLM: "" tokenizes to the BOS the tokenizer adds, a prompt like any other."""
    client = await instance_client()
    status, body = await _post(client, "/v1/completions", {**COMPLETION, "prompt": ""})
    assert status == 200, body
    assert len(client.app[ENGINE].requests[-1].prompt_token_ids) == 1  # BOS
    status, body = await _post(client, "/v1/completions", {**COMPLETION, "prompt": []})
    assert status == 400 and body["error"]["param"] == "prompt"


async def test_a_client_gone_before_the_stream_starts_ends_it_quietly(
        instance_client: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The client left between its request and the stream's headers (the first token was
    still being computed): the request is aborted, and nothing is logged as an error."""
    import aiohttp
    from aiohttp import web

    client = await _scripted(instance_client, _out([A]))  # running: no finish reason
    real = web.StreamResponse.prepare

    async def gone(self: web.StreamResponse, request: Any) -> Any:
        if isinstance(self, web.Response):  # JSON answers (errors) still go out
            return await real(self, request)
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")

    monkeypatch.setattr(web.StreamResponse, "prepare", gone)
    caplog.set_level("DEBUG")
    with pytest.raises(aiohttp.ClientError):
        async with client.post("/v1/completions",
                               data=msgspec.json.encode({**COMPLETION, "stream": True})) as r:
            await r.read()
    engine = client.app[ENGINE]
    assert engine.aborted == [engine.requests[-1].request_id]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], \
        caplog.text
