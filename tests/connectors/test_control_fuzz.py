"""Fuzz the KV control plane of a running P/D pair (READ and WRITE) with raw ZMQ and TCP.

Everything a peer can send lands on two sockets of each engine's control thread
(connectors/control_plane.py): the handshake ROUTER and the notify PULL. From a fixed seed,
a few hundred frames go to both ports of both engines: random bytes, truncated and bit-flipped
msgpack of every message type, frames just above MAX_FRAME_BYTES, wrong envelopes (DEALER with
1, 2, 3 and 5 frames, raw TCP), valid messages with random transfer ids and identities, block
ids at the bounds (2**31 must not decode), messages and handshakes that claim the real peer's
engine id with another epoch, and strangers that identify themselves (a compatible handshake)
with a notify address ZMQ cannot connect to, then ask for a reply.

Then: both engines alive, the control threads answer real handshakes and a real P/D request
gives exactly the monolithic greedy tokens (nothing a stranger sent unseated the real peer),
the malformed / unidentified / refused counters rose, both ledgers are clean.

One P/D pair serves the READ and the WRITE test (each request names its mode, ``pd_request``;
the configured mode is only a default); the WRITE test fuzzes it from another seed, after the
READ test's fuzz, and the counters are read as differences.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
import requests  # type: ignore[import-untyped]
import zmq
from pd_helpers import (
    BASE,
    alive,
    compatible_metadata,
    handshake,
    info,
    kv_config,
    metric,
    pd_request,
    push_frames,
    wait_clean,
)
from support import Instance, start_instances, stop_all

from connectors.protocol import (
    CONTROL_VERSION,
    MAX_FRAME_BYTES,
    HandshakeRequest,
    Lease,
    Quiesce,
    Quiesced,
    Release,
    ReleaseAck,
    RemoteBlocks,
    TransferFailed,
    WriteDone,
    encoder,
    hello_ack_decoder,
    notify_decoder,
)

SEED = 20240611
TIMEOUTS = {"transfer_timeout": 3, "defer_timeout": 3, "lease_timeout": 2,
            "heartbeat_interval": 0.3}
PROMPT = [(11 * i) % 240 + 1 for i in range(40)]
BODY: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                        "ignore_eos": True, "return_token_ids": True}
BAD_HOSTS = ["a b", "x/y", "-", "*"]
HOST_PATTERN = re.compile(r"^[A-Za-z0-9._\-:\[\]%]+$")
"""disagg/common/kv_transfer_params.py's Host: the wire refuses the others at decode."""
"""Hosts that pass the protocol's length bound but that ZMQ refuses to connect to."""
COUNTERS = ("notifications_malformed_total", "notifications_unidentified_total",
            "handshakes_refused_total")


def _tid(rng: random.Random) -> str:
    return "".join(rng.choice("abcdef0123456789-._:") for _ in range(rng.randint(1, 40)))


def _mutants(rng: random.Random, frame: bytes, n: int) -> list[bytes]:
    """``n`` truncated or bit-flipped copies of a valid frame."""
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append(frame[:rng.randrange(len(frame))])
        else:
            b = bytearray(frame)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            out.append(bytes(b))
    return out


def _noise(rng: random.Random, n: int) -> list[bytes]:
    return [rng.randbytes(rng.randint(0, 300)) for _ in range(n)]


# ---- notify port ---------------------------------------------------------------------------
def _messages(rng: random.Random, engine_id: str, epoch: int) -> list[Any]:
    """One valid message of every notification type, from the identity given."""
    tid, gen = _tid(rng), rng.randrange(2**63)
    ids = rng.choice([[0], [2**31 - 1], [0, 2**31 - 1], []])
    who: dict[str, Any] = {"engine_id": engine_id, "epoch": epoch}
    return [
        RemoteBlocks(transfer_id=tid, generation=gen, block_ids=ids, num_tokens=len(ids) * 16,
                     host=rng.choice(["127.0.0.1", *BAD_HOSTS]),
                     handshake_port=rng.randrange(65536), notify_port=rng.randrange(65536),
                     **who),
        WriteDone(transfer_id=tid, generation=gen, digests=[b"\0" * 8], **who),
        Release(transfer_id=tid, generation=gen, **who),
        ReleaseAck(transfer_id=tid, generation=gen, held=True, **who),
        TransferFailed(transfer_id=tid, reason="fuzz", quiesced=rng.random() < 0.5, **who),
        Quiesce(transfer_id=tid, **who),
        Quiesced(transfer_id=tid, **who),
        Lease(transfer_ids=[tid, _tid(rng)], **who),
    ]


def _notify_frames(rng: random.Random, peer_id: str, strangers: list[str]) -> list[bytes]:
    """Valid messages from random identities, from the real peer's engine id with a wrong
    epoch and from identified strangers; their mutants; block ids past the bound; noise."""
    valid: list[bytes] = []
    for _ in range(6):
        valid += [encoder.encode(m) for m in _messages(rng, _tid(rng), rng.randrange(2**63))]
    valid += [encoder.encode(m) for m in _messages(rng, peer_id, rng.randrange(2**63))]
    for stranger in strangers:  # identified: their replies go to an unconnectable address
        valid += [encoder.encode(m) for m in _messages(rng, stranger, 1)]
    bad_ids = RemoteBlocks(transfer_id="t", engine_id="e", epoch=0, generation=0,
                           block_ids=[2**31], num_tokens=16, host="h", handshake_port=1,
                           notify_port=1)  # a Struct is not validated when built, only decoded
    mutants = [x for f in rng.sample(valid, 40) for x in _mutants(rng, f, 2)]
    huge_tag = msgspec.msgpack.encode({"type": "x" * 100_000})
    frames = valid + mutants + [encoder.encode(bad_ids)] * 3 + [huge_tag] + _noise(rng, 40)
    rng.shuffle(frames)
    return frames


# ---- handshake port ------------------------------------------------------------------------
def _hello(meta: Any, version: int = CONTROL_VERSION) -> bytes:
    return encoder.encode(HandshakeRequest(version=version, metadata=meta))


def _req_all(addr: tuple[str, int], frames: list[tuple[bytes, bool | None]]) -> None:
    """Each frame over one REQ socket: every one is answered by a HandshakeResponse that
    decodes; ``accept`` True/False says whether it must accept or refuse (None: either)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.connect(f"tcp://{addr[0]}:{addr[1]}")
        for frame, accept in frames:
            sock.send(frame)
            assert sock.poll(5000), f"no handshake reply to {frame[:60]!r}"
            reply = hello_ack_decoder.decode(sock.recv())
            assert (reply.error is None) == (reply.metadata is not None), reply
            if accept is not None:
                assert (reply.error is None) is accept, (frame[:60], reply.error)
    finally:
        sock.close(linger=0)
        ctx.term()


def _dealer(addr: tuple[str, int], messages: list[list[bytes]]) -> None:
    """Multipart messages from a DEALER (no REQ envelope, or a wrong one)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(f"tcp://{addr[0]}:{addr[1]}")
        for parts in messages:
            sock.send_multipart(parts, copy=sum(map(len, parts)) < 1 << 16)
    finally:
        sock.close(linger=2000)
        ctx.term()


def _raw_tcp(addr: tuple[str, int], payloads: list[bytes]) -> None:
    for payload in payloads:
        with socket.create_connection(addr, timeout=5) as s:
            try:
                s.sendall(payload)
            except OSError:
                pass  # the engine may drop a peer that broke the ZMTP greeting


def _fuzz_handshake(rng: random.Random, target: dict[str, Any],
                    peer: dict[str, Any]) -> list[str]:
    """Fuzz ``target``'s handshake port; returns the strangers it identified (compatible
    handshakes whose notify address is unconnectable)."""
    addr = (target["kv_host"], target["kv_handshake_port"])
    strangers = [f"stranger-{k}-{rng.randrange(10**6)}" for k in range(len(BAD_HOSTS))]
    good = compatible_metadata(target, "fuzz-peer", rng.randrange(2**63))
    frames: list[tuple[bytes, bool | None]] = [
        (_hello(compatible_metadata(target, s, 1, host=h, notify_port=rng.randrange(65536))),
         HOST_PATTERN.match(h) is not None)  # "-" passes the wire's host pattern, "a b" not
        for s, h in zip(strangers, BAD_HOSTS)]
    frames += [
        (_hello(compatible_metadata(target, peer["engine_id"], rng.randrange(2**63))), None),
        (_hello(compatible_metadata(target, target["engine_id"], 5)), False),  # itself
        (_hello(good, version=CONTROL_VERSION + 1), False),
        (_hello(msgspec.structs.replace(good, compat_hash="other-model")), False),
        (_hello(msgspec.structs.replace(good, block_size=8)), False),
        (b"", False),
        (msgspec.msgpack.encode({"type": "x" * 100_000}), False)]  # msgspec quotes a bad tag
    frames += [(f, None) for f in _mutants(rng, _hello(good), 30)]
    frames += [(f, False) for f in _noise(rng, 10) if f]
    _req_all(addr, frames)
    body = _hello(good)
    _dealer(addr, [[body], [b"x", body], [b"", body, b""], [b"", b"", body],
                   [body] * 5, [b""], [rng.randbytes(50)] * 3,
                   [b"", bytes(MAX_FRAME_BYTES + 1)]])
    zmtp = b"\xff" + b"\0" * 8 + b"\x7f"  # a ZMTP signature, then garbage
    _raw_tcp(addr, [rng.randbytes(300), zmtp + rng.randbytes(100), zmtp + b"\x03" * 60])
    return strangers


# ---- the test ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Instance]]:
    """[prefill, decode], shared by both modes."""
    started = start_instances(
        [[*BASE, "--kv-transfer-config", kv_config(role, "read", **TIMEOUTS)]
         for role in ("kv_producer", "kv_consumer")], tmp_path_factory.mktemp("fuzz"))
    try:
        yield started
    finally:
        stop_all(started)


async def _pd(p: Any, d: Any, mode: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        return await pd_request(s, p.url, d.url, BODY, mode, info(p.url), info(d.url))


def _counters(url: str) -> dict[str, float]:
    return {n: metric(url, f"disagg_kv_connector_{n}") for n in COUNTERS}


def _undecodable(frames: list[bytes]) -> int:
    """How many frames the notify decoder refuses (each must count as malformed)."""
    n = 0
    for frame in frames:
        try:
            notify_decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            n += 1
    return n


def _counted(inst: Any, before: dict[str, float], malformed: int,
             timeout_s: float = 10.0) -> None:
    """Each counter of ``inst`` rose past ``before`` (malformed by at least ``malformed``:
    its engine thread handled the frames) within the deadline; fails at once, with the log,
    if the instance died meanwhile."""
    deadline = time.monotonic() + timeout_s
    rise = {**dict.fromkeys(COUNTERS, 1), "notifications_malformed_total": malformed}
    while True:
        assert alive(inst), f"{inst.url} died:\n{inst.log()[-3000:]}"
        now = _counters(inst.url)
        if all(now[n] >= before[n] + rise[n] for n in COUNTERS):
            return
        assert time.monotonic() < deadline, (inst.url, before, now)
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ["read", "write"])
def test_control_plane_survives_fuzz(pair: list[Instance], mode: str) -> None:
    """A few hundred hostile frames on both ports of both engines (module docstring)."""
    p, d = pair
    r = requests.post(p.url + "/v1/completions", json=BODY, timeout=60)
    expected = r.json()["choices"][0]["token_ids"]
    status, out = asyncio.run(_pd(p, d, mode))  # the real peers have identified each other
    assert status == 200 and out["choices"][0]["token_ids"] == expected, out
    before = {x.url: _counters(x.url) for x in (p, d)}
    rng = random.Random(SEED + ("read", "write").index(mode))
    for x, y in ((p, d), (d, p)):
        target = info(x.url)
        strangers = _fuzz_handshake(rng, target, info(y.url))
        notify = (target["kv_host"], target["kv_notify_port"])
        frames = _notify_frames(rng, info(y.url)["engine_id"], strangers)
        push_frames(*notify, frames)
        push_frames(*notify, [bytes(MAX_FRAME_BYTES + 1)], linger_s=1.0)
        _counted(x, before[x.url], _undecodable(frames))
    for x in (p, d):  # the control thread still answers a real handshake
        i = info(x.url)
        reply = handshake(i["kv_host"], i["kv_handshake_port"],
                          compatible_metadata(i, "after-the-fuzz", 1))
        assert reply.metadata is not None and reply.metadata.engine_id == i["engine_id"]
    for _ in range(2):
        status, out = asyncio.run(_pd(p, d, mode))
        assert status == 200, out
        assert out["choices"][0]["token_ids"] == expected
    wait_clean(p.url, timeout_s=15)
    wait_clean(d.url, timeout_s=15)
    assert alive(p) and alive(d)
