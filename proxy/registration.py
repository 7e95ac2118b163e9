"""Dynamic registration over ZMQ, proxy side: ``RegistrationServer`` binds a PULL socket and
hands each message to callbacks. The instance side (disagg/server/registrar.py) PUSHes a
``Heartbeat`` carrying its full ``InstanceInfo`` every ``interval_s``, its prefix cache's
changes (``KVEvents``) and a ``Deregister`` on shutdown; the messages live in
disagg/common/registration.py, which both sides import. Every heartbeat is a complete
registration, so a restarted proxy re-learns its pool within one interval. Nothing but those
msgpack-encoded structs, within their bounds, is accepted on the socket: anything else is
dropped and counted by reason (ZMQ itself drops frames over MAX_MESSAGE_BYTES). With a
registration key only frames sealed with it count (``unauthenticated`` otherwise)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from disagg.common.registration import (
    MAX_CLOCK_SKEW_S,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SEAL_BYTES,
    Deregister,
    Heartbeat,
    InstanceInfo,
    KVEvents,
    KVRole,
    RegistrationMessage,
    SealError,
    check_key,
    decode_message,
    unseal,
    zmq_address,
)

logger = logging.getLogger(__name__)
MAX_SENDERS = 16384
"""Instances whose last sealed frame time is kept (replay refusal). Only one whose last frame
is older than the clock window may be forgotten (any replay of it is refused as stale); while
the table is full of fresher ones, a new sender's frames are dropped (``senders``)."""

__all__ = ["Deregister", "Heartbeat", "InstanceInfo", "KVEvents", "KVRole",
           "RegistrationBindError", "RegistrationServer"]


class RegistrationBindError(OSError):
    """The registration address cannot be bound (in use, or not this host's)."""


def _ignore(msg: KVEvents) -> None:
    """The default KVEvents callback: a proxy that routes without them."""


class RegistrationServer:
    """Proxy side: a bound PULL socket; each valid message goes to a callback."""

    def __init__(self, address: str, on_heartbeat: Callable[[Heartbeat], None],
                 on_deregister: Callable[[Deregister], None],
                 on_kv_events: Callable[[KVEvents], None] = _ignore,
                 dropped: Counter[str] | None = None, *, key: str | None = None) -> None:
        self._address = zmq_address(address, bind=True)
        self._key = check_key(key)
        self._max_frame = MAX_MESSAGE_BYTES + (SEAL_BYTES if key is not None else 0)
        self._last_sent: dict[tuple[str, str], float] = {}
        """Per instance (URL, engine id): the newest sealed frame's time taken."""
        self._on_heartbeat = on_heartbeat
        self._on_deregister = on_deregister
        self._on_kv_events = on_kv_events
        self.dropped: Counter[str] = Counter() if dropped is None else dropped
        """Frames dropped, by reason: oversized, unauthenticated, malformed, version,
        replayed, senders (a new sender while MAX_SENDERS were all heard within the clock
        window), error."""
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.MAXMSGSIZE, self._max_frame)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = ""
        """The bound endpoint (a ``*`` port resolved), set by ``bind()``."""

    def bind(self) -> str:
        """Bind the socket; return the endpoint actually bound."""
        try:
            self._sock.bind(self._address)
        except zmq.ZMQError as exc:
            raise RegistrationBindError(
                f"cannot bind registration address {self._address}: {exc.strerror}") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    async def serve(self) -> None:
        """Receive and dispatch messages until cancelled."""
        while True:
            data = await self._sock.recv()
            self.dispatch(data)

    def dispatch(self, data: bytes) -> None:
        """Decode one frame and call the matching callback; bad frames are counted, logged
        (the first of each kind, then every 1000th) and dropped. Nothing raises."""
        if len(data) > self._max_frame:
            self._drop("oversized", f"{len(data)} bytes")
            return
        try:
            payload, sent_s = unseal(data, self._key)
        except SealError as exc:
            self._drop("unauthenticated", str(exc))
            return
        try:
            msg = decode_message(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._drop("malformed", str(exc))
            return
        if msg.version != PROTOCOL_VERSION:
            self._drop("version", f"protocol version {msg.version} (want {PROTOCOL_VERSION})")
            return
        if sent_s is not None:
            why = self._fresh(msg, sent_s)
            if why is not None:
                self._drop(*why)
                return
        try:
            if isinstance(msg, Heartbeat):
                self._on_heartbeat(msg)
            elif isinstance(msg, KVEvents):
                self._on_kv_events(msg)
            else:
                self._on_deregister(msg)
        except Exception:  # a bug must not end registration for good
            logger.exception("handling a %s message failed", type(msg).__name__)
            self.dropped["error"] += 1

    def _fresh(self, msg: RegistrationMessage, sent_s: float) -> tuple[str, str] | None:
        """None when a sealed frame may count: each instance's must come newer each time (a
        captured one replayed within the clock window is refused). Else why it is dropped."""
        who = (msg.info.http_url, msg.info.engine_id) if isinstance(msg, Heartbeat) \
            else (msg.http_url, msg.engine_id)
        last = self._last_sent.get(who)
        if last is not None and sent_s <= last:
            return "replayed", "a sealed frame no newer than the last from that instance"
        if last is None and len(self._last_sent) >= MAX_SENDERS:
            # kept most recent last: forget senders from before the clock window only
            stale_s = time.time() - MAX_CLOCK_SKEW_S
            while self._last_sent and next(iter(self._last_sent.values())) < stale_s:
                del self._last_sent[next(iter(self._last_sent))]
            if len(self._last_sent) >= MAX_SENDERS:
                return "senders", (f"{MAX_SENDERS} instances sent sealed frames within "
                                   f"{MAX_CLOCK_SKEW_S:g} s; a new one waits")
        self._last_sent.pop(who, None)
        self._last_sent[who] = sent_s  # most recently taken last
        return None

    def _drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        if self.dropped[reason] % 1000 == 1:
            logger.warning("dropped a registration message (%s, %d so far): %s", reason,
                           self.dropped[reason], detail)

    def close(self) -> None:
        """Close the socket and its context."""
        self._sock.close(linger=0)
        self._ctx.term()
