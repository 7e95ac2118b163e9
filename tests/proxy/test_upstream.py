"""Calls to instances: the ``--kv-params-key`` header on every one, and instance refusals
relayed as the instance sent them (a user's mistake is never a 502)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.config import PolicyName, TransferMode
from proxy.registry import Instance, Origin, Pool
from proxy.upstream import UpstreamFailure, client_error_text, upstream_headers, while_up

KEY = "0123456789abcdef0123456789abcdef"
BODY = {"prompt": "The capital of France is", "max_tokens": 4}


async def _until(predicate: Any, timeout_s: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


async def _pair(fakes: Any, proxies: Any, mode: str, instance_key: str | None,
                proxy_key: str | None) -> tuple[Any, Any, Any]:
    p = await fakes(role="kv_producer", mode=mode, kv_params_key=instance_key)
    d = await fakes(role="kv_consumer", mode=mode, kv_params_key=instance_key,
                    kv_handshake_port=18000)
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,), mode=TransferMode(mode),
                          policy=PolicyName.ROUND_ROBIN, kv_params_key=proxy_key)
    return p, d, proxy


def test_headers_carry_the_key_only_when_configured() -> None:
    assert upstream_headers(None) == {}
    assert upstream_headers(KEY) == {"X-Disagg-KV-Key": KEY}


@pytest.mark.parametrize("mode", ["read", "write"])
@pytest.mark.parametrize("stream", [False, True])
async def test_every_call_carries_the_key(fakes: Any, proxies: Any, http: Any, mode: str,
                                          stream: bool) -> None:
    p, d, proxy = await _pair(fakes, proxies, mode, instance_key=KEY, proxy_key=KEY)
    async with http.post(proxy.url + "/v1/completions",
                         json={**BODY, "stream": stream}) as resp:
        assert resp.status == 200
        await resp.read()
    assert len(p.requests) == 1 and len(d.requests) == 1
    d.behavior.fail_status = 400  # refused by D: the prefill is aborted, with the key
    async with http.post(proxy.url + "/v1/completions", json=BODY) as resp:
        assert resp.status == 400
    await _until(lambda: len(p.aborts) == 1)
    assert p.kv_keys and all(k == KEY for k in p.kv_keys + d.kv_keys)


async def test_without_a_key_none_is_sent(fakes: Any, proxies: Any, http: Any) -> None:
    p, d, proxy = await _pair(fakes, proxies, "read", instance_key=None, proxy_key=None)
    async with http.post(proxy.url + "/v1/completions", json=BODY) as resp:
        assert resp.status == 200
    assert p.kv_keys == [None] and d.kv_keys == [None]


async def test_a_wrong_key_is_relayed_as_the_instances_401(fakes: Any, proxies: Any,
                                                           http: Any) -> None:
    p, _, proxy = await _pair(fakes, proxies, "read", instance_key=KEY, proxy_key="other")
    async with http.post(proxy.url + "/v1/completions", json=BODY) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "authentication_error"
    assert p.requests == []


async def test_an_instance_400_is_relayed_as_400_not_502(fakes: Any, proxies: Any,
                                                         http: Any) -> None:
    p, d, proxy = await _pair(fakes, proxies, "read", instance_key=None, proxy_key=None)
    p.behavior.fail_status = 400
    async with http.post(proxy.url + "/v1/completions", json=BODY) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == "fake failure"
    assert d.requests == []


def test_a_reply_body_is_decoded_once_however_many_readers_ask(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A READ prefill's answer gives its kv_transfer_params, first token and timings: one
    decode serves them all, and a body that is not a JSON object reads as None."""
    import msgspec

    from proxy.upstream import Reply

    calls = []
    real = msgspec.json.decode

    def counting(body: bytes, **kw: Any) -> Any:
        calls.append(body)
        return real(body, **kw)

    monkeypatch.setattr(msgspec.json, "decode", counting)
    reply = Reply(200, b'{"kv_transfer_params": {"a": 1}, "choices": []}', "application/json")
    assert reply.json_object() == {"kv_transfer_params": {"a": 1}, "choices": []}
    assert reply.json_object() is reply.json_object()
    assert len(calls) == 1
    for body in (b"[1, 2]", b"not json", b"[" * 100_000, b'"text"'):
        bad = Reply(200, body, "application/json")
        assert bad.json_object() is None
        assert bad.json_object() is None
    assert len(calls) == 5


async def test_while_up_gives_up_on_an_instance_that_went_down_and_cleans_up() -> None:
    """The call waiting on an instance the proxy gave up on is cancelled and finished (its
    cleanup ran) before the UpstreamFailure; a cancelled caller does the same."""

    inst = Instance("http://127.0.0.1:9", Pool.DECODE, Origin.STATIC)
    cleaned: list[str] = []

    async def call(name: str) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.append(name)

    waiting = asyncio.ensure_future(while_up(call("down"), inst, "decode"))
    await asyncio.sleep(0.01)
    inst.last_error = "probe timed out"
    inst.down.set()
    with pytest.raises(UpstreamFailure, match="stopped answering its health checks"):
        await waiting
    assert cleaned == ["down"]
    inst.down = asyncio.Event()
    caller = asyncio.ensure_future(while_up(call("caller"), inst, "decode"))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert cleaned == ["down", "caller"]
    assert await while_up(asyncio.sleep(0, result=7), inst, "decode") == 7


async def test_failures_talking_to_an_instance_are_worded_not_python_reprs(
        fakes: Any, proxies: Any, http: Any) -> None:
    """A prefill that drops the connection: the client's 5xx body says what happened in
    words, never ``ServerDisconnectedError(...)`` or ``ClientConnectorError(ConnectionKey(``."""
    p, d, proxy = await _pair(fakes, proxies, "read", instance_key=None, proxy_key=None)
    p.behavior.drop_connection = True
    async with http.post(proxy.url + "/v1/completions", json=BODY) as resp:
        message = (await resp.json())["error"]["message"]
    assert resp.status >= 500 and "closed the connection" in message, message
    assert "Error(" not in message and "ConnectionKey" not in message, message
    assert client_error_text(asyncio.TimeoutError()) == "timed out"
    assert client_error_text(RuntimeError()) == "the connection failed"
