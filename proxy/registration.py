"""Dynamic registration over ZMQ, proxy side: ``RegistrationServer`` binds a PULL socket and
hands each message to callbacks. The instance side (disagg/server/registrar.py) PUSHes a
``Heartbeat`` carrying its full ``InstanceInfo`` every ``interval_s`` and a ``Deregister`` on
shutdown; the messages live in disagg/common/registration.py, which both sides import. Every
heartbeat is a complete registration, so a restarted proxy re-learns its pool within one
interval. Nothing but those msgpack-encoded structs is accepted on the socket."""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from disagg.common.registration import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Deregister,
    Heartbeat,
    InstanceInfo,
    KVRole,
    check_address,
    decode_message,
)

logger = logging.getLogger(__name__)

__all__ = ["Deregister", "Heartbeat", "InstanceInfo", "KVRole", "RegistrationServer"]


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
