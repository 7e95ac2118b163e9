"""tcp wire helpers: frames round-trip, scatter/gather survives partial syscalls."""

from __future__ import annotations

import socket
import threading

import msgspec
import pytest

from connectors.transports.tcp_wire import (
    PeerClosedError,
    TcpDescriptor,
    TcpReply,
    TcpRequest,
    decode_descriptor,
    drain,
    encode_descriptor,
    recv_frame,
    recv_into_views,
    send_frame,
    send_views,
)


def _socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(10)
        # Tiny kernel buffers force partial sendmsg/recvmsg_into calls.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return a, b


def test_frames_and_payload_round_trip() -> None:
    a, b = _socketpair()
    payload = [memoryview(bytes(range(256)) * 1000), memoryview(b""), memoryview(b"xyz" * 7)]
    sender = threading.Thread(target=send_frame,
                              args=(a, TcpRequest("write", [1, 2], [256000, 21]), payload))
    sender.start()
    request = recv_frame(b, TcpRequest)
    assert request == TcpRequest("write", [1, 2], [256000, 21])
    bufs = [bytearray(100), bytearray(255900), bytearray(21)]
    recv_into_views(b, [memoryview(x) for x in bufs])
    sender.join(10)
    assert b"".join(bufs) == bytes(range(256)) * 1000 + b"xyz" * 7
    a.close()
    b.close()


def test_many_small_views_beyond_iov_max() -> None:
    a, b = _socketpair()
    chunks = [bytes([i % 256]) * 3 for i in range(2000)]
    sender = threading.Thread(target=send_views, args=(a, [memoryview(c) for c in chunks]))
    sender.start()
    out = [bytearray(3) for _ in range(2000)]
    recv_into_views(b, [memoryview(x) for x in out])
    sender.join(10)
    assert [bytes(x) for x in out] == chunks
    a.close()
    b.close()


def test_peer_closing_mid_frame_is_an_error() -> None:
    a, b = _socketpair()
    a.sendall(b"\x05\x00")
    a.close()
    with pytest.raises(PeerClosedError):
        recv_frame(b, TcpReply)
    b.close()


def test_drain_keeps_the_stream_in_step() -> None:
    a, b = _socketpair()
    def send() -> None:
        a.sendall(b"z" * 5000)
        send_frame(a, TcpReply(True))

    sender = threading.Thread(target=send)
    sender.start()
    drain(b, 5000, chunk_bytes=1024)
    assert recv_frame(b, TcpReply) == TcpReply(True)
    sender.join(10)
    a.close()
    b.close()


def test_descriptor_round_trip_and_garbage() -> None:
    desc = TcpDescriptor("tcp", 1, "engine-P0", "10.0.0.1", 5555, 1 << 30, b"t" * 16)
    assert decode_descriptor(encode_descriptor(desc)) == desc
    with pytest.raises(msgspec.DecodeError):
        decode_descriptor(b"\xc1")
