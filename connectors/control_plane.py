"""The connector's ZMQ control plane: handshake server, notify receiver, senders.

One background thread owns the two bound sockets:
  ROUTER (handshake_port): answers HandshakeRequest with our metadata or a refusal.
  PULL   (notify_port):    decodes notifications into a queue the engine thread drains.
It also sends the leases (heartbeats) on its own timer, from a snapshot of live transfers the
engine thread refreshes each step: a lease says "this process is alive", so a long engine step
must not make a peer reap transfers that are merely waiting their turn.
The engine thread owns the PUSH sockets to peers (never blocks: NOBLOCK + bounded HWM).
Handshakes to peers run on a small thread pool and return futures, so the step loop never waits.

Nothing a peer sends can stop the thread: every frame is handled in its own try, anything that
does not parse into the typed messages is counted and dropped (logged at most once a second),
frames over MAX_FRAME_BYTES are refused by ZMQ itself. A peer address ZMQ cannot connect to
(hosts are only length-bounded on the wire and in kv_transfer_params) fails that handshake or
drops that send, never raising into the engine step. A handshake from this engine itself (two
hosts with the same ``host``/``base_port`` settings) or without the shared key is refused.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import zmq

from connectors.faults import FaultPlan, corrupt
from connectors.protocol import (
    CONTROL_VERSION,
    MAX_FRAME_BYTES,
    MAX_LEASE_IDS,
    EngineMetadata,
    HandshakeRequest,
    HandshakeResponse,
    Lease,
    Notification,
    encoder,
    hello_ack_decoder,
    hello_decoder,
    notify_decoder,
    tag_of,
)
from disagg.common.config import ConfigError

logger = logging.getLogger(__name__)
CompatCheck = Callable[[EngineMetadata], str | None]
_T = TypeVar("_T")
Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class PeerHello:
    """Engine thread event: a peer identified itself with a handshake we accepted."""

    metadata: EngineMetadata


class RateLimitedLog:
    """At most one log line per second per kind; the rest are only counted."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        """Log unless ``kind`` was logged within the last second."""
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) >= 1.0:
            self._last[kind] = now
            logger.warning(msg, *args)


def brief(exc: BaseException, limit: int = 300) -> str:
    """An exception's text cut to ``limit`` characters: msgspec quotes the offending value (a
    tag can be megabytes long), and a refusal must fit the protocol's 2000-character Reason."""
    text = str(exc)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def proof_of(key: str | None, meta: EngineMetadata) -> bytes:
    """HMAC of a peer's identity under the shared key (empty without a key)."""
    if key is None:
        return b""
    return hmac.new(key.encode(), f"{meta.engine_id}|{meta.epoch}".encode(),
                    hashlib.sha256).digest()


def self_handshake_error(host: str, port: int) -> str:
    """The refusal when a handshake reaches this engine itself."""
    return (f"the KV peer at {host}:{port} is this engine itself: each instance's "
            "kv_connector_extra_config 'host' must be an address its peers can reach (not "
            "127.0.0.1 across hosts) and 'base_port' must not collide with the peer's")


class ControlPlane:
    """Handshake + notifications for one engine core's connector."""

    def __init__(self, host: str, handshake_port: int, notify_port: int,
                 compat_check: CompatCheck, *, auth_key: str | None = None,
                 faults: FaultPlan | None = None) -> None:
        self.host = host
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._pull = self._ctx.socket(zmq.PULL)
        self.handshake_port = self._bind(self._router, handshake_port)
        self.notify_port = self._bind(self._pull, notify_port)
        self._compat_check = compat_check
        self._auth_key = auth_key
        self._faults = faults
        self.metadata: EngineMetadata | None = None
        self.inbox: queue.SimpleQueue[Notification | PeerHello] = queue.SimpleQueue()
        self.wake: Callable[[], None] = lambda: None
        """The engine loop's doorbell (KVConnector.set_wakeup): rung for each item put in the
        inbox and each handshake or probe that ends."""
        self.malformed = 0
        self.refused = 0
        self.dropped_sends = 0
        self.handler_errors = 0
        self._log = RateLimitedLog()
        self._push: dict[Address, zmq.Socket] = {}
        self._lease_push: dict[Address, zmq.Socket] = {}
        self._lease_targets: tuple[dict[Address, list[str]], dict[Address, list[str]]] = ({}, {})
        self._delayed: list[tuple[float, Address, bytes]] = []
        self._delayed_lock = threading.Lock()
        self.heartbeat_interval_s = 1.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-control", daemon=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kv-hello")

    def _bind(self, sock: zmq.Socket, port: int) -> int:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        if port == 0:
            return int(sock.bind_to_random_port(f"tcp://{self.host}"))
        try:
            sock.bind(f"tcp://{self.host}:{port}")
        except zmq.ZMQError as exc:  # in use, or an address this host does not have
            raise ConfigError(f"KV control plane cannot listen on {self.host}:{port} "
                              f"({exc}); choose another base_port or kv_host") from None
        return port

    def start(self, metadata: EngineMetadata) -> None:
        """Begin answering handshakes with ``metadata`` and receiving notifications."""
        self.metadata = metadata
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        last_lease = 0.0
        while not self._stop.is_set():
            try:
                for sock, _ in poller.poll(100):
                    if sock is self._router:
                        self._answer_hello()
                    else:
                        self._receive_notification()
                now = time.monotonic()
                self._send_due(now)
                if now - last_lease >= self.heartbeat_interval_s:
                    last_lease = now
                    self._send_leases()
            except zmq.ContextTerminated:
                return
            except Exception as exc:  # no frame may end this thread; count and go on
                self.handler_errors += 1
                self._log.warning("error", "KV control plane: %s: %s", type(exc).__name__,
                                  brief(exc))

    def set_leases(self, targets: dict[Address, list[str]],
                   received: dict[Address, list[str]] | None = None) -> None:
        """Engine thread: the live transfers to lease, per peer, and the decode blocks held
        for no transfer yet to acknowledge (``Lease.received``), swapped in atomically."""
        self._lease_targets = (targets, received or {})

    def _send_leases(self) -> None:
        assert self.metadata is not None
        leased, received = self._lease_targets
        for targets, waiting in ((leased, False), (received, True)):
            for addr, tids in targets.items():
                for start in range(0, len(tids), MAX_LEASE_IDS):
                    msg = Lease(engine_id=self.metadata.engine_id, epoch=self.metadata.epoch,
                                transfer_ids=tids[start:start + MAX_LEASE_IDS],
                                received=waiting)
                    for frame in self._with_faults(msg, addr):
                        self._send_frame(self._lease_push, addr, frame)

    def _send_due(self, now: float) -> None:
        """Send the delayed frames whose time has come (fault injection only)."""
        if not self._delayed:
            return
        with self._delayed_lock:
            due = [d for d in self._delayed if d[0] <= now]
            self._delayed = [d for d in self._delayed if d[0] > now]
        for _, addr, frame in due:
            self._send_frame(self._lease_push, addr, frame)

    def _connect_push(self, addr: Address) -> zmq.Socket | None:
        """A PUSH socket to a peer's notify address; None if ZMQ refuses the address (a host
        such as ``a b`` passes the protocol's length bound but is no endpoint: sending to it
        must drop the message, not raise into the engine step)."""
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        try:
            sock.connect(f"tcp://{addr[0]}:{addr[1]}")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self._log.warning("address", "cannot send to KV peer %s:%s: %s", addr[0], addr[1],
                              exc)
            return None
        return sock

    def _send_frame(self, sockets: dict[Address, zmq.Socket], addr: Address,
                    frame: bytes) -> bool:
        sock = sockets.get(addr)
        if sock is None:
            sock = self._connect_push(addr)
            if sock is None:
                self.dropped_sends += 1
                return False
            sockets[addr] = sock
        try:
            sock.send(frame, zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped_sends += 1
            return False

    def _with_faults(self, msg: Notification, addr: Address) -> list[bytes]:
        """The frames to send now for ``msg`` (injected faults may drop, delay, duplicate or
        corrupt it)."""
        frame = encoder.encode(msg)
        if self._faults is None:
            return [frame]
        frames = [frame]
        for f in self._faults.fire(tag_of(msg)):
            if f.action == "drop":
                frames = []
            elif f.action == "duplicate":
                frames = frames * 2
            elif f.action == "corrupt":
                frames = [corrupt(x) for x in frames]
            elif f.action == "delay":
                with self._delayed_lock:
                    self._delayed += [(time.monotonic() + f.s, addr, x) for x in frames]
                frames = []
        return frames

    def _answer_hello(self) -> None:
        frames = self._router.recv_multipart()
        if len(frames) != 3 or frames[1] != b"":  # not a REQ peer's [identity, "", body]
            self.malformed += 1
            self._log.warning("hello", "ignored a malformed KV handshake (%d frames)",
                              len(frames))
            return
        ident, _, raw = frames
        assert self.metadata is not None
        reply = self._hello_reply(raw)
        if reply.error is not None:
            self.refused += 1
            self._log.warning("refused", "refused KV handshake: %s", reply.error)
        self._router.send_multipart([ident, b"", encoder.encode(reply)], zmq.NOBLOCK)

    def _hello_reply(self, raw: bytes) -> HandshakeResponse:
        """Our metadata for an acceptable handshake (the peer becomes identified), else why
        not."""
        assert self.metadata is not None
        try:
            req = hello_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return HandshakeResponse(error=f"malformed handshake: {brief(exc)}")
        peer = req.metadata
        if req.version != CONTROL_VERSION:
            return HandshakeResponse(
                error=f"control protocol version {req.version} != {CONTROL_VERSION}")
        if peer.engine_id == self.metadata.engine_id:
            return HandshakeResponse(error=self_handshake_error(self.host, self.handshake_port))
        if not hmac.compare_digest(req.proof, proof_of(self._auth_key, peer)):
            return HandshakeResponse(error="the handshake does not carry this cluster's "
                                           "auth_key (kv_connector_extra_config)")
        error = self._compat_check(peer)
        if error is not None:
            return HandshakeResponse(error=error)
        self._deliver(PeerHello(peer))
        return HandshakeResponse(metadata=self.metadata,
                                 proof=proof_of(self._auth_key, self.metadata))

    def _receive_notification(self) -> None:
        raw = self._pull.recv()
        try:
            self._deliver(notify_decoder.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.malformed += 1
            self._log.warning("notify", "ignored a malformed KV notification (%d bytes): %s",
                              len(raw), brief(exc))

    def _deliver(self, item: Notification | PeerHello) -> None:
        self.inbox.put(item)
        self.wake()

    def _submit(self, fn: Callable[..., _T], *args: object) -> concurrent.futures.Future[_T]:
        """Run ``fn`` on the handshake pool; its end rings the doorbell."""
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _: self.wake())
        return future

    def drain(self) -> list[Notification | PeerHello]:
        """Every notification (and peer hello) received since the last call."""
        out: list[Notification | PeerHello] = []
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def send(self, addr: Address, msg: Notification) -> bool:
        """Fire-and-forget notify to a peer (engine thread only); False if dropped."""
        ok = True
        for frame in self._with_faults(msg, addr):
            ok = self._send_frame(self._push, addr, frame) and ok
        return ok

    def handshake(self, host: str, port: int, timeout_s: float
                  ) -> concurrent.futures.Future[EngineMetadata]:
        """Ask a peer for its metadata; the future fails with a readable error."""
        assert self.metadata is not None
        return self._submit(self._hello, host, port, timeout_s, self.metadata)

    def _hello(self, host: str, port: int, timeout_s: float,
               ours: EngineMetadata) -> EngineMetadata:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        try:
            sock.connect(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConnectionError(f"KV peer address {host}:{port} is not a valid endpoint: "
                                  f"{exc}") from None
        try:
            sock.send(encoder.encode(HandshakeRequest(version=CONTROL_VERSION, metadata=ours,
                                                      proof=proof_of(self._auth_key, ours))))
            if not sock.poll(int(timeout_s * 1000)):
                raise ConnectionError(f"KV peer {host}:{port} did not answer the handshake "
                                      f"within {timeout_s:.0f} s")
            try:
                reply = hello_ack_decoder.decode(sock.recv())
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ConnectionError(f"KV peer {host}:{port} answered a malformed "
                                      f"handshake: {brief(exc)}") from None
        finally:
            sock.close(linger=0)
        return self._check_reply(host, port, reply, ours)

    def _check_reply(self, host: str, port: int, reply: HandshakeResponse,
                     ours: EngineMetadata) -> EngineMetadata:
        if reply.error is not None or reply.metadata is None:
            raise ConnectionError(f"KV handshake refused by {host}:{port}: {reply.error}")
        peer = reply.metadata
        if peer.engine_id == ours.engine_id:
            raise ConnectionError(self_handshake_error(host, port))
        if not hmac.compare_digest(reply.proof, proof_of(self._auth_key, peer)):
            raise ConnectionError(f"KV peer {host}:{port} did not prove this cluster's "
                                  "auth_key")
        error = self._compat_check(peer)
        if error is not None:
            raise ConnectionError(f"KV peer {host}:{port} is incompatible: {error}")
        return peer

    def probe_gone(self, host: str, port: int, engine_id: str, epoch: int
                   ) -> concurrent.futures.Future[bool]:
        """True once the engine (``engine_id``, ``epoch``) at a handshake address is gone for
        sure: nothing listens there (the connection is refused) or another engine answers.
        A frozen or slow process still accepts, and an unreachable host times out: both are
        False, since such a peer may yet act."""
        assert self.metadata is not None
        ours = self.metadata

        def probe() -> bool:
            try:
                socket.create_connection((host, port), timeout=1.0).close()
            except ConnectionRefusedError:
                return True
            except OSError:
                return False
            try:
                meta = self._hello(host, port, 1.0, ours)
            except ConnectionError:
                return False
            return (meta.engine_id, meta.epoch) != (engine_id, epoch)

        return self._submit(probe)

    def close(self) -> None:
        """Stop the thread and close every socket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for sock in [self._router, self._pull, *self._push.values(),
                     *self._lease_push.values()]:
            sock.close(linger=0)
        self._ctx.term()
