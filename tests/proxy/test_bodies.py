"""Client body validation, prompt counting, and the bodies sent to P and D."""

from __future__ import annotations

import msgspec
import pytest

from proxy.bodies import Endpoint, PromptCounter, decode_body, parse_request, prefill_body
from proxy.errors import ProxyError


def _counter(model: str | None = "builtin:tiny-llama") -> PromptCounter:
    return PromptCounter(model, lambda: None)


def test_completion_prompt_counted_with_the_byte_tokenizer() -> None:
    req = parse_request(Endpoint.COMPLETIONS, b'{"prompt": "hello", "max_tokens": 7}', _counter())
    assert req.num_prompt_tokens == 6  # BOS + 5 bytes
    assert req.max_tokens == 7 and req.stream is False
    ids = parse_request(Endpoint.COMPLETIONS, b'{"prompt": [[1, 2, 3]]}', _counter())
    assert ids.num_prompt_tokens == 3 and ids.max_tokens == 16


def test_chat_prompt_counts_the_rendered_template() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "stream": True}
    req = parse_request(Endpoint.CHAT, msgspec.json.encode(body), _counter())
    rendered = "<|user|>\nhi\n<|assistant|>\n"
    assert req.num_prompt_tokens == len(rendered.encode()) + 1
    assert req.stream is True


def test_client_kv_transfer_params_are_dropped() -> None:
    req = parse_request(Endpoint.COMPLETIONS,
                        b'{"prompt": "x", "kv_transfer_params": {"remote_host": "evil"}}',
                        _counter())
    assert "kv_transfer_params" not in req.body


@pytest.mark.parametrize(("endpoint", "raw", "message"), [
    (Endpoint.COMPLETIONS, b"{not json", "not valid JSON"),
    (Endpoint.COMPLETIONS, b"[1]", "JSON object"),
    (Endpoint.COMPLETIONS, b"{}", "'prompt' is required"),
    (Endpoint.COMPLETIONS, b'{"prompt": ["a", ["b"]]}', "each prompt of a batch"),
    (Endpoint.COMPLETIONS, b'{"prompt": 5}', "'prompt' must be"),
    (Endpoint.COMPLETIONS, b'{"prompt": "a", "stream": "yes"}', "'stream'"),
    (Endpoint.CHAT, b'{"messages": []}', "'messages'"),
    (Endpoint.CHAT, b'{"messages": ["hi"]}', "each message"),
])
def test_bad_bodies_are_400s_with_a_clear_message(endpoint: Endpoint, raw: bytes,
                                                   message: str) -> None:
    with pytest.raises(ProxyError) as info:
        parse_request(endpoint, raw, _counter())
    assert info.value.status == 400 and message in info.value.message


def test_prefill_body_is_one_token_not_streamed() -> None:
    body = {"prompt": "x", "max_tokens": 50, "max_completion_tokens": 50, "stream": True,
            "stream_options": {"include_usage": True}, "min_tokens": 5, "n": 2,
            "temperature": 0.5}
    out = prefill_body(body, {"transfer_id": "t"})
    assert out == {"prompt": "x", "max_tokens": 1, "max_completion_tokens": 1, "stream": False,
                   "n": 1, "temperature": 0.5, "min_tokens": 1,  # the first token obeys it
                   "kv_transfer_params": {"transfer_id": "t"}}
    assert prefill_body({**body, "min_tokens": 0}, {})["min_tokens"] == 0
    assert body["max_tokens"] == 50  # the client's body is not modified


def test_sampling_fields_pass_to_both_legs_and_n_above_one_is_refused() -> None:
    fields = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1,
              "min_p": 0.05, "logit_bias": {"65": -100}}
    raw = msgspec.json.encode({"prompt": "x", **fields})
    req = parse_request(Endpoint.COMPLETIONS, raw, _counter())
    assert fields.items() <= prefill_body(req.body, {}).items()  # P samples the first token
    assert fields.items() <= decode_body(req.body, {}).items()
    assert parse_request(Endpoint.COMPLETIONS, b'{"prompt": "x", "n": 3}', _counter()).n == 3
    err = _parse_error(Endpoint.COMPLETIONS, b'{"prompt": "x", "n": 3, "best_of": 4}')
    assert err.param == "best_of" or "best_of" in err.message


def test_decode_body_is_the_clients_plus_params() -> None:
    body = {"prompt": "x", "max_tokens": 5, "stream": True}
    assert decode_body(body, None) == body
    assert decode_body(body, {"a": 1}) == {**body, "kv_transfer_params": {"a": 1}}


def test_counter_waits_for_the_instances_model_name() -> None:
    names: list[str | None] = [None]
    counter = PromptCounter(None, lambda: names[0])
    assert counter.count_prompt("ab") == 3  # a byte tokenizer stands in
    names[0] = "builtin:tiny-llama"
    assert counter.count_prompt("abc") == 4


def _parse_error(endpoint: Endpoint, raw: bytes, max_model_len: int | None = None) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        parse_request(endpoint, raw, _counter(), max_model_len)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize("raw", [
    b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    b'{"prompt": "x", "extra": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    b"[" * 100_000,
])
@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_deep_json_is_a_400_not_a_recursion_error(endpoint: Endpoint, raw: bytes) -> None:
    assert "levels deep" in _parse_error(endpoint, raw).message


@pytest.mark.parametrize(("field", "value"), [
    ("seed", 2**64), ("seed", 2**63), ("top_k", 2**70), ("top_k", -5),
    ("stop_token_ids", [2**64]), ("max_tokens", 2**64), ("logprobs", 2**64), ("n", 2**64),
    ("min_tokens", 2**64), ("temperature", 2**80), ("max_tokens", 0),
])
def test_out_of_range_fields_are_refused_before_routing(field: str, value: object) -> None:
    raw = msgspec.json.encode({"prompt": "x", field: value})
    assert _parse_error(Endpoint.COMPLETIONS, raw).param == field


def test_zero_max_completion_tokens_is_refused() -> None:
    raw = msgspec.json.encode({"messages": [{"role": "user", "content": "hi"}],
                               "max_completion_tokens": 0})
    err = _parse_error(Endpoint.CHAT, raw)
    assert err.message == "max_completion_tokens must be at least 1"
    ok = parse_request(Endpoint.CHAT, msgspec.json.encode(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9,
         "max_completion_tokens": 3}), _counter())
    assert ok.max_tokens == 3


@pytest.mark.parametrize("raw", [
    b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
    b'{"prompt": "x", "temperature": 1e400}', b'{"prompt": "x", "seed": 1e400}',
    b'{"prompt": [true]}', b'{"prompt": [1, -2]}', b'{"prompt": "x", "n": 0}',
    b'{"prompt": "x", "stop": ' + msgspec.json.encode(["s"] * 17) + b"}",
    b'{"prompt": "\xff"}', b'{"prompt": "\\ud800"}', b"",
])
def test_non_finite_and_wrong_values_are_400(raw: bytes) -> None:
    _parse_error(Endpoint.COMPLETIONS, raw)


def test_max_tokens_that_leave_no_room_for_a_prompt_are_refused() -> None:
    raw = b'{"prompt": "x", "max_tokens": 2048}'
    assert _parse_error(Endpoint.COMPLETIONS, raw, max_model_len=2048).param == "max_tokens"
    assert parse_request(Endpoint.COMPLETIONS, raw, _counter(), 2049).max_tokens == 2048
    assert parse_request(Endpoint.COMPLETIONS, raw, _counter(), None).max_tokens == 2048


@pytest.mark.parametrize(("field", "value"), [
    ("response_format", {"type": "json_schema"}), ("tools", [{"type": "function"}]),
    ("guided_regex", "a+")])
def test_unsupported_fields_are_refused_before_routing(field: str, value: object) -> None:
    raw = msgspec.json.encode({"messages": [{"role": "user", "content": "hi"}], field: value})
    err = _parse_error(Endpoint.CHAT, raw)
    assert err.param == field and "not supported" in err.message


def test_a_fan_out_past_the_token_limit_is_a_400() -> None:
    """n x the batch's prompt tokens is bounded: a small body must not become gigabytes."""
    ids = list(range(1, 70_001))
    raw = msgspec.json.encode({"prompt": ids, "n": 16, "max_tokens": 1})
    err = _parse_error(Endpoint.COMPLETIONS, raw, max_model_len=100_000)
    assert err.param == "n" and "limit" in err.message
    raw = msgspec.json.encode({"prompt": [ids[:40_000]] * 2, "n": 16, "max_tokens": 1})
    assert _parse_error(Endpoint.COMPLETIONS, raw, max_model_len=100_000).param == "n"
    assert parse_request(Endpoint.COMPLETIONS, msgspec.json.encode(
        {"prompt": ids, "max_tokens": 1}), _counter(), 100_000).n == 1
