"""The control plane in one process: who may handshake (shared key, never ourselves), what a
handshake teaches the engine thread, and frames that must not stop its thread."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import msgspec
import pytest
import zmq

from connectors.control_plane import ControlPlane, PeerHello
from connectors.protocol import EngineMetadata, Lease, RemoteBlocks


def _meta(cp: ControlPlane, engine_id: str, epoch: int = 7) -> EngineMetadata:
    return EngineMetadata(engine_id=engine_id, epoch=epoch, host=cp.host,
                          handshake_port=cp.handshake_port, notify_port=cp.notify_port,
                          transport="tcp", transport_descriptor=b"d", block_size=16,
                          block_bytes=4096, num_blocks=8, dtype="float32", compat_hash="h",
                          layout="l")


def _plane(engine_id: str, key: str | None = None, epoch: int = 7) -> ControlPlane:
    cp = ControlPlane("127.0.0.1", 0, 0, lambda peer: None, auth_key=key)
    cp.heartbeat_interval_s = 0.05
    cp.start(_meta(cp, engine_id, epoch))
    return cp


@pytest.fixture
def planes() -> Iterator[list[ControlPlane]]:
    made: list[ControlPlane] = []
    yield made
    for cp in made:
        cp.close()


def _hello(a: ControlPlane, b: ControlPlane) -> EngineMetadata:
    return a.handshake(b.host, b.handshake_port, 5.0).result(timeout=10)


def _drain_until(cp: ControlPlane, kind: type, timeout_s: float = 5.0) -> list[object]:
    deadline, got = time.monotonic() + timeout_s, list[object]()
    while time.monotonic() < deadline:
        got += cp.drain()
        if any(isinstance(m, kind) for m in got):
            return got
        time.sleep(0.02)
    raise AssertionError(f"no {kind.__name__} within {timeout_s} s: {got}")


def test_an_accepted_handshake_identifies_the_peer_to_the_engine_thread(planes) -> None:
    a, b = _plane("A"), _plane("B")
    planes += [a, b]
    assert _hello(a, b).engine_id == "B"
    hellos = [m for m in _drain_until(b, PeerHello) if isinstance(m, PeerHello)]
    assert hellos[0].metadata.engine_id == "A" and hellos[0].metadata.epoch == 7


@pytest.mark.parametrize(("key_a", "key_b"), [("k" * 16, None), (None, "k" * 16),
                                              ("k" * 16, "j" * 16)])
def test_a_peer_without_the_shared_key_is_refused(planes, key_a: str | None,
                                                  key_b: str | None) -> None:
    a, b = _plane("A", key_a), _plane("B", key_b)
    planes += [a, b]
    with pytest.raises(ConnectionError, match="auth_key"):
        _hello(a, b)
    assert not [m for m in b.drain() if isinstance(m, PeerHello)]


def test_the_same_key_is_accepted(planes) -> None:
    a, b = _plane("A", "s" * 16), _plane("B", "s" * 16)
    planes += [a, b]
    assert _hello(a, b).engine_id == "B"


def test_a_handshake_with_ourselves_is_refused_naming_the_settings(planes) -> None:
    a = _plane("A")
    planes.append(a)
    with pytest.raises(ConnectionError, match="is this engine itself.*base_port"):
        _hello(a, a)
    assert a.refused == 1


def test_frames_of_any_shape_leave_the_thread_serving(planes) -> None:
    a, b = _plane("A"), _plane("B")
    planes += [a, b]
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://{b.host}:{b.handshake_port}")
        for frames in ([b"x"], [b"", b"y", b"z", b"w"], [b"\x00" * 300]):
            dealer.send_multipart(frames)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(f"tcp://{b.host}:{b.notify_port}")
        valid = msgspec.msgpack.encode(RemoteBlocks(
            transfer_id="t", engine_id="A", epoch=1, generation=1, block_ids=[1], num_tokens=2,
            host="h", handshake_port=1, notify_port=2))
        for frame in (b"", b"\xc1", valid[: len(valid) // 2],
                      valid.replace(b"remote_blocks", b"remote_blockz")):
            push.send(frame)
        push.send(msgspec.msgpack.encode(Lease(engine_id="A", epoch=1, transfer_ids=["t"])))
        _drain_until(b, Lease)
        dealer.close()
        push.close()
    finally:
        ctx.term()
    assert b.malformed >= 5  # the three odd handshakes and at least four bad notifications
    assert _hello(a, b).engine_id == "B"  # the thread still answers


def test_each_delivery_and_each_ended_handshake_rings_the_engine_doorbell(planes) -> None:
    """The engine loop sleeps on its input socket while nothing local is runnable: every item
    the thread puts in the inbox, and every handshake that ends (answered or failed), rings the
    doorbell so the loop acts on it now. A malformed frame rings nothing."""
    a, b = _plane("A"), _plane("B")
    planes += [a, b]
    rings = {"A": 0, "B": 0}

    def bell(name: str) -> Callable[[], None]:
        def ring() -> None:
            rings[name] += 1
        return ring

    a.wake, b.wake = bell("A"), bell("B")
    assert _hello(a, b).engine_id == "B"
    _drain_until(b, PeerHello)
    deadline = time.monotonic() + 5
    while rings["A"] < 1:  # the future's callback runs right after its result is set
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert rings == {"A": 1, "B": 1}
    with pytest.raises(ConnectionError):  # nobody listens there: the failure rings too
        a.handshake("127.0.0.1", 1, 0.5).result(timeout=10)
    while rings["A"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(f"tcp://{b.host}:{b.notify_port}")
        push.send(b"\xc1")
        push.send(msgspec.msgpack.encode(Lease(engine_id="A", epoch=1, transfer_ids=["t"])))
        _drain_until(b, Lease)
        push.close()
    finally:
        ctx.term()
    assert rings["B"] == 2 and b.malformed == 1


def test_leases_for_many_transfers_go_in_bounded_frames(planes,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Lease over MAX_LEASE_IDS ids would be refused by the receiver's decoder: the sender
    splits its ids over several, and every id is leased."""
    from connectors import control_plane

    monkeypatch.setattr(control_plane, "MAX_LEASE_IDS", 2)
    a, b = _plane("A"), _plane("B")
    planes += [a, b]
    tids = [f"t{i}" for i in range(5)]
    a.set_leases({(b.host, b.notify_port): tids})
    deadline, leased, sizes = time.monotonic() + 5, set[str](), list[int]()
    while leased != set(tids):
        assert time.monotonic() < deadline, leased
        for msg in b.drain():
            if isinstance(msg, Lease):
                leased.update(msg.transfer_ids)
                sizes.append(len(msg.transfer_ids))
        time.sleep(0.02)
    assert max(sizes) <= 2
