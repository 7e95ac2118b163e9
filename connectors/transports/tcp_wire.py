"""Wire format of the tcp transport: msgpack headers + raw bytes, never pickle.

Every frame on a connection::

    +------------------+--------------------------+------------------------------+
    | u32 LE hdr_bytes | msgpack header (Struct)  | raw payload (0..N bytes)     |
    +------------------+--------------------------+------------------------------+

A connection starts with ``TcpHello`` (client -> server) answered by ``TcpReply``; then the
client sends ``TcpRequest`` frames one at a time:

* READ:  request (no payload) -> reply + payload = the requested ranges, concatenated in order.
* WRITE: request + payload    -> reply (after the bytes are in the server's region).

Payload bytes move with scatter/gather syscalls (``sendmsg`` / ``recvmsg_into``) straight
from/to memoryviews of the registered regions, so CPU regions are never copied in Python.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

import msgspec

PROTOCOL_VERSION = 1
_LEN = struct.Struct("<I")
_MAX_HEADER_BYTES = 64 * 1024 * 1024
# Linux IOV_MAX is 1024; stay well under it per syscall.
_MAX_IOVECS = 512


class TcpDescriptor(msgspec.Struct, frozen=True):
    """What a peer needs to reach this side's server (sent in the connector handshake)."""

    transport: str
    version: int
    agent_name: str
    host: str
    port: int
    region_bytes: int
    token: bytes
    """Random secret; a connection that does not present it is refused."""


class TcpHello(msgspec.Struct, frozen=True):
    """First frame of every connection."""

    version: int
    token: bytes
    client_name: str


class TcpRequest(msgspec.Struct, frozen=True, array_like=True):
    """One batch of ranges inside the server's region; ``op`` is ``read`` or ``write``."""

    op: str
    remote_offsets: list[int]
    lengths: list[int]


class TcpReply(msgspec.Struct, frozen=True):
    """Server's answer to a hello or a request."""

    ok: bool
    error: str = ""


_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[type, msgspec.msgpack.Decoder] = {
    t: msgspec.msgpack.Decoder(t) for t in (TcpDescriptor, TcpHello, TcpRequest, TcpReply)
}


class PeerClosedError(ConnectionError):
    """The other end closed the connection in the middle of a frame."""


def encode_descriptor(desc: TcpDescriptor) -> bytes:
    """Serialize a descriptor (msgpack)."""
    return _ENCODER.encode(desc)


def decode_descriptor(raw: bytes) -> TcpDescriptor:
    """Parse a descriptor; msgspec.ValidationError / DecodeError on garbage."""
    return _DECODERS[TcpDescriptor].decode(raw)


def send_frame(sock: socket.socket, header: msgspec.Struct,
               payload: Sequence[memoryview] = ()) -> None:
    """Send one frame: length prefix + header + payload views, gathered into few syscalls."""
    body = _ENCODER.encode(header)
    send_views(sock, [memoryview(_LEN.pack(len(body)) + body), *payload])


def recv_frame(sock: socket.socket, kind: type,
               max_bytes: int = _MAX_HEADER_BYTES) -> msgspec.Struct:
    """Receive one frame header of type ``kind`` (the payload is left on the socket); a
    header announced over ``max_bytes`` ends the connection before anything is allocated."""
    (size,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    if size > max_bytes:
        raise ConnectionError(f"frame header of {size} bytes is over the limit")
    result: msgspec.Struct = _DECODERS[kind].decode(recv_exact(sock, size))
    return result


def recv_exact(sock: socket.socket, num_bytes: int) -> bytes:
    """Read exactly ``num_bytes`` (the socket's timeout bounds each wait)."""
    buf = bytearray(num_bytes)
    recv_into_views(sock, [memoryview(buf)])
    return bytes(buf)


def send_views(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """``sendall`` for a list of buffers, with ``sendmsg`` gathering up to 512 per call."""
    pending = [v.cast("B") for v in views if v.nbytes]
    start = 0
    while start < len(pending):
        batch = pending[start:start + _MAX_IOVECS]
        sent = sock.sendmsg(batch)
        start, remainder = _advance(batch, sent, start)
        if remainder is not None:
            pending[start] = remainder


def recv_into_views(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """Fill every buffer in order, scattering with ``recvmsg_into`` up to 512 per call."""
    pending = [v.cast("B") for v in views if v.nbytes]
    start = 0
    while start < len(pending):
        batch = pending[start:start + _MAX_IOVECS]
        got = sock.recvmsg_into(batch)[0]
        if got == 0:
            raise PeerClosedError("peer closed the connection mid-frame")
        start, remainder = _advance(batch, got, start)
        if remainder is not None:
            pending[start] = remainder


def _advance(batch: list[memoryview], num_bytes: int,
             start: int) -> tuple[int, memoryview | None]:
    """After a partial gather/scatter of ``num_bytes``: next index and what is left of it."""
    for view in batch:
        if num_bytes < view.nbytes:
            return start, view[num_bytes:]
        num_bytes -= view.nbytes
        start += 1
    return start, None


def drain(sock: socket.socket, num_bytes: int, chunk_bytes: int = 1 << 20) -> None:
    """Read and drop ``num_bytes`` (payload of a refused WRITE), keeping the stream in step."""
    scratch = memoryview(bytearray(min(chunk_bytes, max(num_bytes, 1))))
    while num_bytes > 0:
        step = min(num_bytes, scratch.nbytes)
        recv_into_views(sock, [scratch[:step]])
        num_bytes -= step


def tune_socket(sock: socket.socket, timeout_s: float) -> None:
    """Low latency for small headers, a per-call timeout for everything."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.settimeout(timeout_s)
