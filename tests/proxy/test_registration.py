"""Dynamic registration over ZMQ: messages, Registrar heartbeats, join and leave."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import msgspec
import pytest
import zmq

from disagg.common.protocol import KVCacheEvents
from disagg.common.registration import (
    MAX_CLOCK_SKEW_S,
    MAX_KV_EVENTS_PER_MESSAGE,
    MAX_MESSAGE_BYTES,
    Deregister,
    Heartbeat,
    InstanceInfo,
    KVEvents,
    KVRole,
    SealError,
    check_key,
    decode_message,
    encode_message,
    seal,
    unseal,
)
from disagg.server.kv_events import InstanceKVView, KVPublisher
from disagg.server.registrar import Registrar
from proxy.config import PolicyName, TransferMode
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
    for interval in (-1.0, 0.0, float("nan"), 1e9):  # a heartbeat that would never expire
        forged = msgspec.msgpack.encode({**msgspec.to_builtins(beat), "interval_s": interval,
                                         "type": "heartbeat"})
        with pytest.raises(msgspec.ValidationError):
            decode_message(forged)


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


def test_sealed_frames_open_only_with_the_key_and_within_the_clock_window() -> None:
    payload = encode_message(Deregister(http_url="http://127.0.0.1:1", engine_id="e"))
    key = "s3cret-key"
    assert seal(payload, None) == payload and unseal(payload, None) == (payload, None)
    frame = seal(payload, key, now_s=1000.0)
    assert unseal(frame, key, now_s=1000.0 + 60) == (payload, 1000.0)
    tampered = bytearray(frame)
    tampered[-1] ^= 1
    for bad in ((frame, "another-key"), (payload, key), (b"short", key),
                (bytes(tampered), key)):
        with pytest.raises(SealError, match="key"):
            unseal(*bad, now_s=1000.0)
    for later in (1000.0 + 600, 1000.0 - 600, float("nan")):  # a replay, or a far clock
        with pytest.raises(SealError, match="clock"):
            unseal(frame, key, now_s=later)
    with pytest.raises(SealError, match="clock"):
        unseal(seal(payload, key, now_s=float("nan")), key, now_s=1.0)
    with pytest.raises(ValueError, match="8"):
        check_key("short")


def test_a_keyed_server_counts_only_frames_sealed_with_its_key() -> None:
    got: list[object] = []
    server = RegistrationServer("tcp://127.0.0.1:*", got.append, got.append, key="s3cret-key")
    try:
        bye = Deregister(http_url="http://127.0.0.1:1", engine_id="e")
        server.dispatch(encode_message(bye))  # a forged deregister, unsealed
        server.dispatch(seal(encode_message(bye), "guessed-key"))
        assert got == [] and server.dropped["unauthenticated"] == 2
        server.dispatch(seal(encode_message(bye), "s3cret-key"))
        assert got == [bye]
        beat = Heartbeat(info=_info("http://127.0.0.1:1"), interval_s=1.0, seq=0)
        sealed = seal(encode_message(beat), "s3cret-key")
        server.dispatch(sealed)
        server.dispatch(sealed)  # captured and replayed: refused
        older = seal(encode_message(bye), "s3cret-key", now_s=time.time() - 60)
        server.dispatch(older)  # sealed before the deregister taken above: refused
        assert got == [bye, beat] and server.dropped["replayed"] == 2
    finally:
        server.close()


@pytest.mark.parametrize("instance_key", ["s3cret-key", None, "another-key"])
async def test_registrars_join_a_keyed_proxy_only_with_its_key(
        fakes: Any, proxies: Any, instance_key: str | None) -> None:
    d = await fakes(role="kv_consumer")
    proxy = await proxies(registration_address="tcp://127.0.0.1:*",
                          registration_key="s3cret-key")
    registrar = Registrar(proxy.state.registration_endpoint, _info(d.url), interval_s=0.05,
                          key=instance_key)
    registrar.start()
    registry = proxy.state.registry
    try:
        if instance_key == "s3cret-key":
            await _wait_for(lambda: registry.get(d.url) is not None)
        else:
            await _wait_for(lambda: registrar.num_sent >= 3)
            await _wait_for(lambda: proxy.state.metrics.registration_dropped[
                "unauthenticated"] >= 3)
            assert registry.get(d.url) is None
    finally:
        await asyncio.to_thread(registrar.stop)


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


async def test_an_instance_whose_engine_cannot_serve_stops_heartbeating(
        fakes: Any, proxies: Any) -> None:
    """While the engine is frozen or dead (``unavailable`` gives a reason) no heartbeat goes
    out: the proxy drops the instance after its missed-heartbeat limit instead of routing
    requests that would fail; it registers again once the engine answers."""
    d = await fakes(role="kv_consumer")
    proxy = await proxies(registration_address="tcp://127.0.0.1:*", max_missed_heartbeats=2)
    frozen: list[str] = []
    registrar = Registrar(proxy.state.registration_endpoint, _info(d.url), interval_s=0.1,
                          unavailable=lambda: frozen[0] if frozen else None)
    registrar.start()
    registry = proxy.state.registry
    try:
        await _wait_for(lambda: registry.get(d.url) is not None)
        frozen.append("engine core (DP rank 0) has not answered for 30.0 s")
        sent = registrar.num_sent
        await _wait_for(lambda: registry.get(d.url) is None, timeout_s=3.0)
        assert registrar.num_sent <= sent + 1
        frozen.clear()
        await _wait_for(lambda: registry.get(d.url) is not None, timeout_s=3.0)
    finally:
        await asyncio.to_thread(registrar.stop)


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


def _kv_frame(url: str, **fields: Any) -> bytes:
    """A KVEvents frame as msgpack, any field replaced (even by what the struct refuses)."""
    body: dict[str, Any] = {"type": "kv_events", "http_url": url, "engine_id": "e-" + url[-5:],
                            "seq": 0, "changes": [[True, 1], [False, 2]], "snapshot": None,
                            "version": 1, **fields}
    return msgspec.msgpack.encode(body)


def _mutations(rng: random.Random, valid: bytes) -> list[bytes]:
    """Random variants of ``valid``: truncated, bytes flipped, garbage."""
    out = [valid[:rng.randrange(len(valid))] for _ in range(50)]
    for _ in range(150):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        out.append(bytes(data))
    return out + [bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
                  for _ in range(50)]


def _out_of_bounds(url: str) -> list[bytes]:
    """KVEvents frames that break a bound or a type, one field at a time."""
    return [_kv_frame(url, changes=[[True, 1]] * (MAX_KV_EVENTS_PER_MESSAGE + 1)),
            _kv_frame(url, snapshot=[1] * (MAX_KV_EVENTS_PER_MESSAGE + 1)),
            _kv_frame(url, changes=[[True, 1 << 63]]), _kv_frame(url, changes=[[True, -1]]),
            _kv_frame(url, changes=[[1, 2, 3]]), _kv_frame(url, changes=[["x", 1]]),
            _kv_frame(url, snapshot=[1.5]), _kv_frame(url, seq=-1), _kv_frame(url, seq="0"),
            _kv_frame("h" * 1025), _kv_frame(url, engine_id="e" * 257),
            _kv_frame(url, changes={"a": 1}), _kv_frame(url, version=2), b"\xc1", b"",
            bytes(MAX_MESSAGE_BYTES + 1)]


def test_fuzzed_kv_events_frames_are_dropped_and_counted() -> None:
    rng = random.Random(1234)
    got: list[KVEvents] = []
    server = RegistrationServer("tcp://127.0.0.1:*", lambda m: None, lambda m: None, got.append)
    try:
        for frame in _out_of_bounds("http://127.0.0.1:9100"):
            server.dispatch(frame)
            assert got == [], frame[:80]
        assert server.dropped["oversized"] == 1 and server.dropped["version"] == 1
        assert sum(server.dropped.values()) == len(_out_of_bounds(""))
        frames = _mutations(rng, _kv_frame("http://127.0.0.1:9100"))
        before = sum(server.dropped.values())
        for frame in frames:
            server.dispatch(frame)  # never raises
        assert sum(server.dropped.values()) - before + len(got) == len(frames)
        assert len(got) < len(frames) // 2
        for msg in got:  # whatever got through is a message within every bound
            assert decode_message(encode_message(msg)) == msg
            assert len(msg.changes) <= MAX_KV_EVENTS_PER_MESSAGE and msg.seq >= 0
    finally:
        server.close()


async def test_kv_events_of_registered_instances_reach_the_index(fakes: Any,
                                                                 proxies: Any) -> None:
    p = await fakes(role="kv_producer")
    proxy = await proxies(registration_address="tcp://127.0.0.1:*", policy=PolicyName.KV_AWARE)
    info = msgspec.structs.replace(_info(p.url, KVRole.PRODUCER), block_size=16, hash_seed=7)
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.PUSH) for _ in range(2)]
    try:
        for sock in socks:
            sock.connect(proxy.state.registration_endpoint)
        bad, good = socks
        # garbage and a frame over ZMQ's cap first (ZMQ drops that sender's connection)
        bad.send(_kv_frame(p.url, seq=-1))
        bad.send(bytes(MAX_MESSAGE_BYTES + 100))
        good.send(encode_message(KVEvents(http_url=p.url, engine_id=info.engine_id, seq=0,
                                          snapshot=[1])))  # before its heartbeat: unknown
        good.send(encode_message(Heartbeat(info=info, interval_s=1.0, seq=0)))
        good.send(encode_message(KVEvents(http_url=p.url, engine_id="other", seq=0,
                                          snapshot=[1])))  # another engine at that URL
        good.send(encode_message(KVEvents(http_url=p.url, engine_id=info.engine_id, seq=1,
                                          snapshot=[1, 2])))
        index, dropped = proxy.state.kv_index, proxy.state.metrics.registration_dropped
        await _wait_for(lambda: index.fresh(p.url))  # the receiver survived all of it
        assert index.num_hashes == 2
        assert dropped["malformed"] == 1 and dropped["unknown_instance"] == 2
        # a Deregister naming another engine at that URL is forged: the instance stays
        good.send(encode_message(Deregister(http_url=p.url, engine_id="other")))
        await _wait_for(lambda: dropped["unknown_instance"] == 3)
        assert index.fresh(p.url) and proxy.state.registry.get(p.url) is not None
        good.send(encode_message(Deregister(http_url=p.url, engine_id=info.engine_id)))
        await _wait_for(lambda: not index.fresh(p.url))
        assert index.num_hashes == 0
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


async def test_registrar_publishes_the_instance_kv_view(fakes: Any, proxies: Any) -> None:
    p = await fakes(role="kv_producer")
    proxy = await proxies(registration_address="tcp://127.0.0.1:*", policy=PolicyName.KV_AWARE)
    info = msgspec.structs.replace(_info(p.url, KVRole.PRODUCER), block_size=16, hash_seed=7)
    view = InstanceKVView(dp_size=2)
    view.apply(0, KVCacheEvents(changes=[(True, 1), (True, 2)]))
    view.apply(1, KVCacheEvents(changes=[(True, 2), (True, 3)]))
    kv = KVPublisher(view, info.http_url, info.engine_id, interval_s=0.02)
    registrar = Registrar(proxy.state.registration_endpoint, info, interval_s=0.5, kv=kv)
    registrar.start()
    try:
        index = proxy.state.kv_index
        await _wait_for(lambda: index.fresh(p.url) and index.num_hashes == 3)
        view.apply(0, KVCacheEvents(changes=[(False, 1), (False, 2), (True, 4)]))
        await _wait_for(lambda: index.num_hashes == 3 and index.cached_blocks(
            p.url, [2, 3, 4], 0.0) == 3)  # 2 stays: rank 1 holds it
    finally:
        await asyncio.to_thread(registrar.stop)
    await _wait_for(lambda: not index.fresh(p.url), timeout_s=2.0)  # deregistered: forgotten


def test_a_full_replay_table_forgets_only_senders_a_replay_of_would_be_stale(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_SENDERS, a sender is forgotten only when its last frame is older than the
    clock window (a replay of it is refused as stale then); while every one is fresher, a new
    sender's frames wait, and no known sender's replay is ever let through."""
    import proxy.registration as registration

    monkeypatch.setattr(registration, "MAX_SENDERS", 3)
    key = "s3cret-key"
    got: list[object] = []
    server = RegistrationServer("tcp://127.0.0.1:*", got.append, got.append, key=key)
    try:
        now = time.time()

        def bye(i: int, at: float) -> bytes:
            msg = Deregister(http_url=f"http://127.0.0.1:{i}", engine_id="e")
            return seal(encode_message(msg), key, now_s=at)

        old = bye(0, now - MAX_CLOCK_SKEW_S + 2)  # still in the window, not for long
        for frame in (old, bye(1, now), bye(2, now)):
            server.dispatch(frame)
        server.dispatch(bye(3, now))  # a fourth sender: the table holds fresh ones only
        assert len(got) == 3 and server.dropped["senders"] == 1
        server.dispatch(old)  # and sender 0 was not forgotten: its replay is refused
        assert server.dropped["replayed"] == 1
        monkeypatch.setattr(registration.time, "time", lambda: now + 3)
        server.dispatch(bye(3, now + 3))  # sender 0's last frame left the window: it goes
        assert len(got) == 4
        server.dispatch(bye(1, now))  # the others are still known: replays refused
        assert server.dropped["replayed"] == 2
    finally:
        server.close()
