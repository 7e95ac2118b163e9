"""Dynamic registration over ZMQ: the message types and both ends of the channel.

Instance side: ``Registrar`` (a daemon thread) PUSHes a ``Heartbeat`` carrying the instance's
full ``InstanceInfo`` every ``interval_s``; ``stop()`` sends a ``Deregister``. Proxy side:
``RegistrationServer`` binds a PULL socket and hands each message to callbacks. Every heartbeat
is a complete registration, so a restarted proxy re-learns its pool within one interval.
Messages are msgpack-encoded ``msgspec.Struct``s; nothing else is accepted on the socket.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from proxy.config import TransferMode

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
"""Bumped when a message changes incompatibly; the proxy drops other versions."""
MAX_MESSAGE_BYTES = 64 * 1024
"""Larger frames are dropped by ZMQ before they reach the decoder."""


class KVRole(enum.Enum):
    """An instance's role in P/D (the ``kv_role`` of its kv-transfer-config)."""

    PRODUCER = "kv_producer"
    CONSUMER = "kv_consumer"
    BOTH = "kv_both"


class InstanceInfo(msgspec.Struct, kw_only=True, frozen=True):
    """What an instance says about itself: the body of ``GET /instance_info``."""

    role: KVRole
    engine_id: str
    http_url: str
    max_model_len: int
    mode: TransferMode | None = None
    block_size: int | None = None
    dp_size: int = 1
    model: str | None = None
    kv_host: str | None = None
    kv_handshake_port: int | None = None
    kv_notify_port: int | None = None


class Heartbeat(msgspec.Struct, tag="heartbeat", kw_only=True, frozen=True):
    """Instance -> proxy, every ``interval_s``: "I am alive and this is who I am"."""

    info: InstanceInfo
    interval_s: float
    seq: int
    version: int = PROTOCOL_VERSION


class Deregister(msgspec.Struct, tag="deregister", kw_only=True, frozen=True):
    """Instance -> proxy, once, on a clean shutdown: remove me now."""

    http_url: str
    engine_id: str
    version: int = PROTOCOL_VERSION


RegistrationMessage = Heartbeat | Deregister
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RegistrationMessage)


def encode_message(msg: Heartbeat | Deregister) -> bytes:
    """One message as msgpack bytes."""
    return _encoder.encode(msg)


def decode_message(data: bytes) -> Heartbeat | Deregister:
    """Bytes back to a message; raises ``msgspec.DecodeError`` / ``ValidationError``."""
    return _decoder.decode(data)


def check_address(address: str) -> str:
    """Refuse anything but a ZMQ ``tcp://`` or ``ipc://`` address, with a readable message."""
    if not address.startswith(("tcp://", "ipc://")):
        raise ValueError(f"proxy address {address!r} must look like tcp://HOST:PORT")
    return address


class Registrar:
    """Instance side: heartbeats to the proxy from a daemon thread; ``stop()`` deregisters."""

    def __init__(self, proxy_address: str, info: InstanceInfo, interval_s: float = 2.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"heartbeat interval must be positive, got {interval_s}")
        self._address = check_address(proxy_address)
        self._info = info
        self._interval_s = interval_s
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_sent = 0
        """Heartbeats handed to ZMQ (for tests and logs)."""

    def start(self) -> None:
        """Start the heartbeat thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="disagg-registrar", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Send a deregister, stop the thread and wait for it at most ``timeout_s``."""
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        # The socket lives and dies in this thread: ZMQ sockets are not thread-safe.
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        # IMMEDIATE: queue nothing while no proxy is connected, so no stale heartbeats pile up.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.connect(self._address)
        try:
            self._heartbeat_loop(sock)
            self._send(sock, Deregister(http_url=self._info.http_url,
                                        engine_id=self._info.engine_id), wait_s=0.5)
        finally:
            sock.close(linger=500)
            ctx.term()

    def _heartbeat_loop(self, sock: zmq.Socket) -> None:
        seq = 0
        while not self._stop_event.is_set():
            msg = Heartbeat(info=self._info, interval_s=self._interval_s, seq=seq)
            if self._send(sock, msg, wait_s=min(self._interval_s, 0.2)):
                seq += 1
                self.num_sent += 1
                self._stop_event.wait(self._interval_s)

    @staticmethod
    def _send(sock: zmq.Socket, msg: Heartbeat | Deregister, wait_s: float) -> bool:
        # POLLOUT with IMMEDIATE means "a proxy is connected"; otherwise retry next round.
        if not sock.poll(int(wait_s * 1000), zmq.POLLOUT):
            return False
        try:
            sock.send(encode_message(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True


class RegistrationServer:
    """Proxy side: a bound PULL socket; each valid message goes to a callback."""

    def __init__(self, address: str, on_heartbeat: Callable[[Heartbeat], None],
                 on_deregister: Callable[[Deregister], None]) -> None:
        self._address = check_address(address)
        self._on_heartbeat = on_heartbeat
        self._on_deregister = on_deregister
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = ""
        """The bound endpoint (a ``*`` port resolved), set by ``bind()``."""

    def bind(self) -> str:
        """Bind the socket; return the endpoint actually bound."""
        try:
            self._sock.bind(self._address)
        except zmq.ZMQError as exc:
            raise OSError(f"cannot bind registration address {self._address}: {exc}") from exc
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    async def serve(self) -> None:
        """Receive and dispatch messages until cancelled."""
        while True:
            data = await self._sock.recv()
            self.dispatch(data)

    def dispatch(self, data: bytes) -> None:
        """Decode one frame and call the matching callback; bad frames are logged and dropped."""
        try:
            msg = decode_message(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("dropped a malformed registration message: %s", exc)
            return
        if msg.version != PROTOCOL_VERSION:
            logger.warning("dropped a registration message of protocol version %d (want %d)",
                           msg.version, PROTOCOL_VERSION)
            return
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(msg)
        else:
            self._on_deregister(msg)

    def close(self) -> None:
        """Close the socket and its context."""
        self._sock.close(linger=0)
        self._ctx.term()
