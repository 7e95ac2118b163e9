"""Instance side of dynamic registration: heartbeats carrying the instance's ``InstanceInfo``
to the proxy from a daemon thread, and (with a ``KVPublisher``) the prefix cache's changes every
publish interval; ``stop()`` deregisters (disagg/common/registration.py has the messages,
proxy/registration.py the receiving end)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq

from disagg.common.registration import (
    Deregister,
    Heartbeat,
    InstanceInfo,
    RegistrationMessage,
    check_key,
    encode_message,
    seal,
    zmq_address,
)
from disagg.server.kv_events import KVPublisher

logger = logging.getLogger(__name__)
SEND_HWM = 64
"""Frames ZMQ may queue toward a connected proxy (a snapshot goes out as a burst of chunks)."""


class Registrar:
    """Instance side: heartbeats to the proxy from a daemon thread; ``stop()`` deregisters.
    While ``unavailable()`` gives a reason (the engine died or every rank is frozen) no
    heartbeat goes out, so the proxy drops the instance after its missed-heartbeat limit
    instead of routing requests it cannot serve; they resume when it answers again."""

    def __init__(self, proxy_address: str, info: InstanceInfo, interval_s: float = 2.0,
                 kv: KVPublisher | None = None,
                 unavailable: Callable[[], str | None] | None = None,
                 key: str | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"heartbeat interval must be positive, got {interval_s}")
        self._address = zmq_address(proxy_address)
        self._info = info
        self._key = check_key(key)
        """Seals every frame (registration.seal) when set."""
        self._sealed_s = 0.0
        """The last seal's time: each is later (the proxy refuses one that is not)."""
        self._interval_s = interval_s
        self._kv = kv
        self._unavailable = unavailable
        self._withheld: str | None = None
        """Why heartbeats are withheld now (None while they go out)."""
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
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.connect(self._address)
        try:
            self._heartbeat_loop(sock)
            self._send(sock, Deregister(http_url=self._info.http_url,
                                        engine_id=self._info.engine_id), wait_s=0.5)
        finally:
            sock.close(linger=500)
            ctx.term()

    def _heartbeat_loop(self, sock: zmq.Socket) -> None:
        """Heartbeats every interval (retried until one goes out); between them, the KV
        changes every publish interval, once the proxy has heard of this instance."""
        seq = 0
        next_beat_s = time.monotonic()
        while not self._stop_event.is_set():
            now_s = time.monotonic()
            if now_s >= next_beat_s and self._withhold():
                next_beat_s = now_s + self._interval_s
            elif now_s >= next_beat_s:
                msg = Heartbeat(info=self._info, interval_s=self._interval_s, seq=seq)
                if not self._send(sock, msg, wait_s=min(self._interval_s, 0.2)):
                    if self._kv is not None:
                        self._kv.lost()  # no proxy listens: it gets a snapshot once one does
                    continue
                seq += 1
                self.num_sent += 1
                next_beat_s = now_s + self._interval_s
            wake_s = next_beat_s
            if self._kv is not None and self._withheld is None:  # a dropped instance's
                self._publish_kv(sock, now_s)  # events would be refused as unknown
                wake_s = min(wake_s, now_s + self._kv.interval_s)
            self._stop_event.wait(max(0.0, wake_s - time.monotonic()))

    def _withhold(self) -> bool:
        """True while the engine cannot serve (logged when that changes)."""
        reason = None if self._unavailable is None else self._unavailable()
        if reason != self._withheld:
            if reason is not None:
                logger.warning("heartbeats to the proxy withheld: %s", reason)
            else:
                logger.info("engine answers again: heartbeats to the proxy resume")
                if self._kv is not None:
                    self._kv.lost()  # the proxy dropped its view: a snapshot comes next
            self._withheld = reason
        return reason is not None

    def _publish_kv(self, sock: zmq.Socket, now_s: float) -> None:
        assert self._kv is not None
        for msg in self._kv.messages(now_s):
            if not self._send(sock, msg, wait_s=0.2):
                self._kv.lost()  # the rest would leave a gap: a snapshot follows instead
                return

    def _send(self, sock: zmq.Socket, msg: RegistrationMessage, wait_s: float) -> bool:
        # POLLOUT with IMMEDIATE means "a proxy is connected"; otherwise retry next round.
        if not sock.poll(int(wait_s * 1000), zmq.POLLOUT):
            return False
        try:
            sealed_s = max(time.time(), self._sealed_s + 1e-6)
            sock.send(seal(encode_message(msg), self._key, sealed_s), zmq.NOBLOCK)
            self._sealed_s = sealed_s
        except zmq.Again:
            return False
        return True
