"""The instance's request edge: every user error is a 4xx with an OpenAI-style body.

Regression tests for bodies that used to end in a 500 (deep nesting, integers past 64 bits),
were accepted although invalid (``top_k: -5``, ``max_completion_tokens: 0``), or reached
kv_transfer_params without the ``--kv-params-key``. They run the real app over a fake engine.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from disagg.common.openai_api import (
    MAX_JSON_DEPTH,
    ApiError,
    CompletionRequest,
    decode_body,
    nesting_exceeds,
)
from disagg.server.api_server import ENGINE, ServerInfo
from disagg.server.engine_health import EngineDeadError, EngineUnavailableError

KEY = "kv-secret"
KV_HEADER = {"X-Disagg-KV-Key": KEY}
OK_COMPLETION = {"prompt": "hello", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
READ_PARAMS = {"transfer_id": "xfer-1", "do_remote_decode": True, "mode": "read"}


def _nested(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return opener * depth + closer * depth


async def _post(client: Any, path: str, body: Any, headers: dict[str, str] | None = None
                ) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    async with client.post(path, data=data, headers=headers) as resp:
        return resp.status, await resp.json()


def _assert_openai_error(status: int, body: Any, expected: int = 400) -> dict[str, Any]:
    assert status == expected, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], body
    return dict(err)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000])
def test_nesting_past_the_limit_is_detected(depth: int) -> None:
    assert nesting_exceeds(b'{"prompt": ' + _nested(depth) + b"}")
    assert nesting_exceeds(b'{"a": ' * depth + b"1" + b"}" * depth)


def test_nesting_within_the_limit_and_brackets_in_strings_pass() -> None:
    assert not nesting_exceeds(_nested(MAX_JSON_DEPTH))
    assert not nesting_exceeds(b'["' + b"[" * 5000 + b'"]')  # text, not nesting
    assert not nesting_exceeds(b'["\\"' + b"{" * 5000 + b'"]')  # an escaped quote stays text
    assert not nesting_exceeds(b"[" + b"[1]," * 5000 + b"[]]")  # wide, not deep


@pytest.mark.parametrize("raw", [
    b'{"prompt": ' + _nested(1000) + b"}",
    b'{"prompt": "x", "user": ' + _nested(5000, b'{"a":', b"}") + b"}",
    b'{"prompt": "x", "unknown": ' + _nested(3000) + b"}",
])
async def test_deep_json_is_a_400_on_the_instance(instance_client: Any, raw: bytes) -> None:
    client = await instance_client()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/kv_transfer/abort"):
        err = _assert_openai_error(*await _post(client, path, raw))
        assert "levels deep" in err["message"]


async def test_deep_json_is_a_400_on_the_admin_api(instance_client: Any) -> None:
    client = await instance_client(admin_key="adm")
    raw = b'{"method": "stats", "args": ' + _nested(2000, b'{"a":', b"}") + b"}"
    _assert_openai_error(*await _post(client, "/collective_rpc", raw,
                                      {"Authorization": "Bearer adm"}))


@pytest.mark.parametrize(("field", "value"), [
    ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 2**63), ("top_k", 2**70),
    ("stop_token_ids", [2**64]), ("stop_token_ids", [2**31]), ("stop_token_ids", [-1]),
    ("max_tokens", 2**64), ("logprobs", 2**64), ("logprobs", 21), ("n", 2**64),
    ("min_tokens", 2**64), ("prompt", [2**64]), ("temperature", 2**80),
])
async def test_out_of_range_integers_are_400_naming_the_field(instance_client: Any, field: str,
                                                              value: Any) -> None:
    client = await instance_client()
    err = _assert_openai_error(*await _post(client, "/v1/completions",
                                            {**OK_COMPLETION, field: value}))
    assert err["param"] == field


@pytest.mark.parametrize("seed", [-(2**63), 2**63 - 1, 0, -1])
async def test_every_signed_64_bit_seed_reaches_the_engine(instance_client: Any,
                                                           seed: int) -> None:
    client = await instance_client()
    status, body = await _post(client, "/v1/completions", {**OK_COMPLETION, "seed": seed})
    assert status == 200, body
    assert client.app[ENGINE].requests[-1].sampling_params.seed == seed


@pytest.mark.parametrize(("top_k", "ok"), [(-5, False), (-2, False), (-1, True), (0, True),
                                           (1, True), (50, True)])
async def test_top_k_is_minus_one_zero_or_positive(instance_client: Any, top_k: int,
                                                    ok: bool) -> None:
    client = await instance_client()
    status, body = await _post(client, "/v1/completions", {**OK_COMPLETION, "top_k": top_k})
    if ok:
        assert status == 200, body
        assert client.app[ENGINE].requests[-1].sampling_params.top_k == max(top_k, 0)
    else:
        assert _assert_openai_error(status, body)["param"] == "top_k"


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/chat/completions", "max_completion_tokens", 0),
    ("/v1/chat/completions", "max_completion_tokens", -3),
    ("/v1/chat/completions", "max_tokens", 0),
    ("/v1/completions", "max_tokens", 0),
    ("/v1/completions", "max_tokens", -1),
])
async def test_zero_or_negative_max_tokens_is_a_400(instance_client: Any, path: str, field: str,
                                                    value: int) -> None:
    client = await instance_client()
    base = OK_CHAT if "chat" in path else OK_COMPLETION
    err = _assert_openai_error(*await _post(client, path, {**base, field: value}))
    assert err["message"] == f"{field} must be at least 1" and err["param"] == field
    assert client.app[ENGINE].requests == []


async def test_max_completion_tokens_wins_over_max_tokens(instance_client: Any) -> None:
    client = await instance_client()
    status, _ = await _post(client, "/v1/chat/completions",
                            {**OK_CHAT, "max_tokens": 50, "max_completion_tokens": 2})
    assert status == 200
    assert client.app[ENGINE].requests[-1].sampling_params.max_tokens == 2


@pytest.mark.parametrize("raw", [
    b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "temperature": Infinity}',
    b'{"prompt": "x", "top_p": -Infinity}', b'{"prompt": "x", "temperature": 1e400}',
    b'{"prompt": "x", "top_p": 1e-400}', b'{"prompt": "x", "seed": 1.5}',
    b'{"prompt": "x", "temperature": 2.5}', b'{"prompt": "x", "top_p": 0}',
    b'{"prompt": "x", "stream": "yes"}', b'{"prompt": "x", "stop": [1]}',
    b'{"prompt": [true, false]}', b'{"prompt": "x", "stop": ' +
    msgspec.json.encode(["s"] * 17) + b"}",
    b'{"prompt": "x", "stop_token_ids": ' + msgspec.json.encode([1] * 1025) + b"}",
    b'{"prompt": "x", "stop": "' + b"s" * 1025 + b'"}',
    b'{"prompt": "x", "max_tokens": 4, "min_tokens": 5}',
    b'{"prompt": "\\ud800"}', b'{"prompt": "\xff"}', b"[]", b"null", b"  ",
])
async def test_non_finite_and_wrong_types_are_400(instance_client: Any, raw: bytes) -> None:
    client = await instance_client()
    _assert_openai_error(*await _post(client, "/v1/completions", raw))
    assert client.app[ENGINE].requests == []


@pytest.mark.parametrize(("raw", "null"), [
    (b'{"prompt": "x", "max_tokens": -5, "max_tokens": 2}', False),
    (b'{"prompt": "x", "max_tokens": -5, "max_tokens": 2, "user": null}', True),
    (b'{"prompt": "x", "max_tokens": 2, "max_tokens": 3}', False),
])
def test_of_a_key_given_twice_the_last_value_counts(raw: bytes, null: bool) -> None:
    """Whether the body has a null in it or not (two decoding paths), and as in the proxy,
    which reads bodies into dicts: the last value counts, an earlier invalid one is no 400."""
    assert (b"null" in raw) is null
    last = msgspec.json.decode(raw)["max_tokens"]
    assert decode_body(raw, CompletionRequest).max_tokens == last
    with pytest.raises(ApiError) as info:
        decode_body(b'{"prompt": "x", "max_tokens": 2, "max_tokens": -5}', CompletionRequest)
    assert info.value.param == "max_tokens"


def test_a_null_max_tokens_asks_for_the_context_an_absent_one_for_16() -> None:
    assert decode_body(b'{"prompt": "x", "max_tokens": null}', CompletionRequest) \
        .max_tokens is None
    assert decode_body(b'{"prompt": "x"}', CompletionRequest).max_tokens == 16
    assert decode_body(b'{"prompt": "x", "n": null}', CompletionRequest).max_tokens == 16


def test_decode_body_names_the_bound_it_broke() -> None:
    with pytest.raises(ApiError) as info:
        decode_body(b'{"prompt": "x", "logprobs": 1025}', CompletionRequest)
    assert info.value.message == "logprobs must be at most 1024"
    assert info.value.param == "logprobs" and info.value.status == 400


async def test_kv_params_need_the_key_when_one_is_set(instance_client: Any) -> None:
    client = await instance_client(kv_params_key=KEY)
    body = {**OK_COMPLETION, "kv_transfer_params": READ_PARAMS}
    for headers in (None, {"X-Disagg-KV-Key": "wrong"}, {"X-Disagg-KV-Key": ""}):
        err = _assert_openai_error(*await _post(client, "/v1/completions", body, headers), 401)
        assert err["type"] == "authentication_error"
    assert client.app[ENGINE].requests == []
    status, _ = await _post(client, "/v1/completions", body, KV_HEADER)
    assert status == 200
    assert client.app[ENGINE].requests[-1].kv_transfer_params.transfer_id == "xfer-1"
    status, _ = await _post(client, "/v1/completions", OK_COMPLETION)  # no params: no key
    assert status == 200


async def test_a_prefill_refuses_a_prompt_with_no_room_for_the_decodes_max_tokens(
        instance_client: Any) -> None:
    """P runs max_tokens=1 but is told the client's max_tokens for the decode: a prompt that
    leaves no room for them is a 400 before anything is computed (the decode would refuse it
    after the prefill ran, in a stream the proxy already answered 200)."""
    client = await instance_client(kv_params_key=KEY)

    def body(after: int, decode_len: int = 256) -> dict[str, Any]:  # BOS + 199 bytes
        return {"prompt": "x" * 199, "max_tokens": 1, "kv_transfer_params": {
            **READ_PARAMS, "decode_max_tokens": after, "decode_max_model_len": decode_len}}

    err = _assert_openai_error(*await _post(client, "/v1/completions", body(57), KV_HEADER))
    assert err["code"] == "context_length_exceeded" and "257 tokens" in err["message"]
    assert client.app[ENGINE].requests == []
    status, out = await _post(client, "/v1/completions", body(56), KV_HEADER)
    assert status == 200 and out["choices"], out
    # a decode pool with a longer context than this prefill's 256 serves it: P computes it
    status, out = await _post(client, "/v1/completions", body(300, 1024), KV_HEADER)
    assert status == 200 and out["choices"], out
    assert len(client.app[ENGINE].requests) == 2


async def test_a_model_is_retrieved_by_its_id_as_the_openai_client_does(
        instance_client: Any) -> None:
    client = await instance_client()
    async with client.get("/v1/models") as resp:
        listed = (await resp.json())["data"][0]
    async with client.get("/v1/models/" + listed["id"]) as resp:
        assert resp.status == 200 and await resp.json() == listed
    async with client.get("/v1/models/org/another-model") as resp:
        err = _assert_openai_error(resp.status, await resp.json(), 404)
    assert err["code"] == "model_not_found" and "org/another-model" in err["message"]


async def test_kv_abort_needs_the_key_when_one_is_set(instance_client: Any) -> None:
    client = await instance_client(kv_params_key=KEY)
    abort = {"transfer_id": "xfer-9"}
    err = _assert_openai_error(*await _post(client, "/v1/kv_transfer/abort", abort), 401)
    assert err["type"] == "authentication_error"
    assert client.app[ENGINE].aborted_transfers == []
    status, body = await _post(client, "/v1/kv_transfer/abort", abort, KV_HEADER)
    assert (status, body) == (200, {"transfer_id": "xfer-9", "found": False})


@pytest.mark.parametrize("why", [
    EngineDeadError("engine core dp0 died (exit code -9)"),
    EngineUnavailableError("the engine core did not answer 'kv_abort' within 10 s")])
async def test_engine_calls_on_an_unavailable_engine_are_a_503(
        instance_client: Any, caplog: pytest.LogCaptureFixture,
        why: EngineUnavailableError) -> None:
    """A KV abort (the proxy's), the ledger: an engine dead, stalled or silent past the call's
    deadline is a 503 naming why, logged as no bug (it was a 500 and a traceback)."""
    client = await instance_client()

    async def unavailable(*args: Any, **kwargs: Any) -> list[Any]:
        raise why

    client.app[ENGINE].utility = unavailable
    err = _assert_openai_error(*await _post(client, "/v1/kv_transfer/abort",
                                            {"transfer_id": "xfer-3"}), 503)
    assert err["message"] == f"engine unavailable: {why}"
    async with client.get("/v1/kv_ledger") as resp:
        _assert_openai_error(resp.status, await resp.json(), 503)
    assert "unhandled error" not in caplog.text


async def test_without_a_key_params_and_aborts_are_validated_only(instance_client: Any) -> None:
    client = await instance_client()
    status, _ = await _post(client, "/v1/kv_transfer/abort", {"transfer_id": "xfer-2"})
    assert status == 200
    for bad in ({"transfer_id": 5}, {"transfer_id": "a b"}, {}, [1]):
        _assert_openai_error(*await _post(client, "/v1/kv_transfer/abort", bad))
    err = _assert_openai_error(*await _post(client, "/v1/completions", {
        **OK_COMPLETION, "kv_transfer_params": {**READ_PARAMS, "remote_block_ids": [2**64]}}))
    assert err["param"] == "kv_transfer_params"


async def _raw_request(client: Any, head: bytes, body: bytes = b"") -> tuple[int, Any]:
    """One HTTP/1.1 request written byte for byte (aiohttp's client re-encodes headers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(head + b"\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    response = await reader.read()
    writer.close()
    head_bytes, _, payload = response.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), msgspec.json.decode(payload)


async def test_undecodable_key_headers_are_401_not_500(instance_client: Any) -> None:
    client = await instance_client(kv_params_key=KEY, admin_key="adm")
    key = b"\xff\xed\xa0\x80" + KEY.encode()  # not UTF-8: arrives surrogate-escaped
    status, body = await _raw_request(client, b"POST /v1/kv_transfer/abort HTTP/1.1\r\n"
                                      b"X-Disagg-KV-Key: " + key, b'{"transfer_id": "x"}')
    _assert_openai_error(status, body, 401)
    status, body = await _raw_request(client, b"GET /is_paused HTTP/1.1\r\n"
                                      b"Authorization: Bearer " + key)
    _assert_openai_error(status, body, 401)


def test_server_info_takes_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISAGG_KV_PARAMS_KEY", "from-env")
    assert ServerInfo("m", "m", "http://h:1").kv_params_key == "from-env"
    assert ServerInfo("m", "m", "http://h:1", kv_params_key="flag").kv_params_key == "flag"
    monkeypatch.setenv("DISAGG_KV_PARAMS_KEY", "")
    assert ServerInfo("m", "m", "http://h:1").kv_params_key is None


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "auto"),
    ("/v1/completions", "suffix", "tail"),
    ("/v1/completions", "guided_json", {"type": "object"}),
])
async def test_unsupported_fields_are_a_400_naming_them(instance_client: Any, path: str,
                                                        field: str, value: Any) -> None:
    """They used to be dropped silently: a client asking for JSON output or a penalty got a
    200 computed without it."""
    client = await instance_client()
    base = OK_CHAT if "chat" in path else OK_COMPLETION
    err = _assert_openai_error(*await _post(client, path, {**base, field: value}))
    assert err["param"] == field and "not supported" in err["message"], err
    assert client.app[ENGINE].requests == []


@pytest.mark.parametrize(("field", "value"), [
    ("response_format", {"type": "text"}), ("tools", []), ("tool_choice", "none"),
    ("logit_bias", {}), ("best_of", 1), ("repetition_penalty", 1.0), ("min_p", 0),
    ("some_future_field", {"x": 1})])
async def test_no_op_values_and_unknown_fields_pass(instance_client: Any, field: str,
                                                    value: Any) -> None:
    client = await instance_client()
    status, body = await _post(client, "/v1/chat/completions", {**OK_CHAT, field: value})
    assert status == 200, body


async def test_image_parts_are_a_400(instance_client: Any) -> None:
    client = await instance_client()
    body = {**OK_CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    err = _assert_openai_error(*await _post(client, "/v1/chat/completions", body))
    assert "image_url" in err["message"] and err["param"] == "messages"
    assert client.app[ENGINE].requests == []
