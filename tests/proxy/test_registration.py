"""Dynamic registration over ZMQ: messages, Registrar heartbeats, join and leave."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import zmq

from disagg.common.registration import (
    Deregister,
    Heartbeat,
    InstanceInfo,
    KVRole,
    decode_message,
    encode_message,
)
from disagg.server.registrar import Registrar
from proxy.config import TransferMode
from proxy.registration import RegistrationServer
from proxy.registry import InstanceState, Origin, Pool


def _info(url: str, role: KVRole = KVRole.CONSUMER) -> InstanceInfo:
    return InstanceInfo(role=role, mode=TransferMode.READ, engine_id="e-" + url[-5:],
                        http_url=url, max_model_len=512, kv_host="127.0.0.1",
                        kv_handshake_port=17000, kv_notify_port=17001, model="builtin:tiny-llama")


async def _wait_for(predicate: Any, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


def test_messages_round_trip_as_msgpack() -> None:
    beat = Heartbeat(info=_info("http://127.0.0.1:9100"), interval_s=1.5, seq=3)
    assert decode_message(encode_message(beat)) == beat
    bye = Deregister(http_url="http://127.0.0.1:9100", engine_id="e")
    assert decode_message(encode_message(bye)) == bye
    with pytest.raises(msgspec.DecodeError):
        decode_message(b"\x93garbage")


def test_instance_info_parses_the_http_body_and_ignores_extra_fields() -> None:
    raw = (b'{"role": "kv_producer", "mode": null, "engine_id": "e", "http_url": "http://h:1",'
           b' "max_model_len": 8, "block_size": 16, "dp_size": 2, "model": "m",'
           b' "kv_host": null, "kv_handshake_port": null, "kv_notify_port": null, "new": 1}')
    info = msgspec.json.decode(raw, type=InstanceInfo)
    assert info.role is KVRole.PRODUCER and info.mode is None and info.dp_size == 2


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        Registrar("127.0.0.1:5000", _info("http://127.0.0.1:1"))
    with pytest.raises(ValueError, match="positive"):
        Registrar("tcp://127.0.0.1:5000", _info("http://127.0.0.1:1"), interval_s=0)


def test_server_drops_malformed_and_foreign_version_messages() -> None:
    got: list[object] = []
    server = RegistrationServer("tcp://127.0.0.1:*", got.append, got.append)
    try:
        server.dispatch(b"not msgpack at all")
        old = Heartbeat(info=_info("http://127.0.0.1:1"), interval_s=1.0, seq=0, version=99)
        server.dispatch(encode_message(old))
        assert got == []
        bye = Deregister(http_url="http://127.0.0.1:1", engine_id="e")
        server.dispatch(encode_message(bye))
        assert got == [bye]
    finally:
        server.close()


def test_registrar_stop_returns_without_a_proxy() -> None:
    registrar = Registrar("tcp://127.0.0.1:9", _info("http://127.0.0.1:1"), interval_s=0.05)
    registrar.start()
    registrar.stop(timeout_s=3.0)
    assert registrar.num_sent == 0


async def test_registrar_joins_serves_and_leaves(fakes: Any, proxies: Any, http: Any) -> None:
    p = await fakes(role="kv_producer")
    d = await fakes(role="kv_consumer")
    proxy = await proxies(prefill_urls=(p.url,), registration_address="tcp://127.0.0.1:*")
    endpoint = proxy.state.registration_endpoint
    assert endpoint and endpoint.startswith("tcp://127.0.0.1:")
    registrar = Registrar(endpoint, _info(d.url), interval_s=0.1)
    registrar.start()
    try:
        registry = proxy.state.registry
        await _wait_for(lambda: len(registry.healthy(Pool.DECODE)) == 1)
        inst = registry.get(d.url)
        assert inst is not None and inst.origin is Origin.DYNAMIC
        async with http.post(proxy.url + "/v1/completions",
                             json={"model": "m", "prompt": "x"}) as resp:
            assert resp.status == 200
        assert len(d.requests) == 1
    finally:
        await asyncio.to_thread(registrar.stop)
    await _wait_for(lambda: registry.get(d.url) is None, timeout_s=2.0)
    assert registrar.num_sent >= 1


async def test_missed_heartbeats_leave_the_pool(fakes: Any, proxies: Any) -> None:
    d = await fakes(role="kv_consumer")
    proxy = await proxies(registration_address="tcp://127.0.0.1:*", max_missed_heartbeats=3)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    try:
        sock.connect(proxy.state.registration_endpoint)
        # One heartbeat announcing a 0.1 s interval, then silence (a crashed instance).
        sock.send(encode_message(Heartbeat(info=_info(d.url), interval_s=0.1, seq=0)))
        registry = proxy.state.registry
        await _wait_for(lambda: registry.get(d.url) is not None)
        inst = registry.get(d.url)
        assert inst is not None and inst.state is InstanceState.HEALTHY
        await _wait_for(lambda: registry.get(d.url) is None, timeout_s=2.0)
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_a_heartbeat_with_the_wrong_mode_is_rejected(fakes: Any, proxies: Any) -> None:
    d = await fakes(role="kv_consumer", mode="write")
    proxy = await proxies(registration_address="tcp://127.0.0.1:*")
    info = msgspec.structs.replace(_info(d.url), mode=TransferMode.WRITE)
    registrar = Registrar(proxy.state.registration_endpoint, info, interval_s=0.1)
    registrar.start()
    try:
        registry = proxy.state.registry
        await _wait_for(lambda: registry.get(d.url) is not None)
        inst = registry.get(d.url)
        assert inst is not None and inst.state is InstanceState.REJECTED
        assert "runs KV mode write" in str(inst.last_error)
        assert registry.healthy(Pool.DECODE) == []
    finally:
        await asyncio.to_thread(registrar.stop)
