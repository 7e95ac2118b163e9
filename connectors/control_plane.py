"""The connector's ZMQ control plane: handshake server, notify receiver, senders.

One background thread owns the two bound sockets:
  ROUTER (handshake_port): answers HandshakeRequest with our metadata or a refusal.
  PULL   (notify_port):    decodes notifications into a queue the engine thread drains.
It also sends the leases (heartbeats) on its own timer, from a snapshot of live transfers the
engine thread refreshes each step: a lease says "this process is alive", so a long engine step
must not make a peer reap transfers that are merely waiting their turn.
The engine thread owns the PUSH sockets to peers (never blocks: NOBLOCK + bounded HWM).
Handshakes to peers run on a small thread pool and return futures, so the step loop never waits.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from connectors.protocol import (
    CONTROL_VERSION,
    EngineMetadata,
    HandshakeRequest,
    HandshakeResponse,
    Lease,
    Notification,
    encoder,
    hello_ack_decoder,
    hello_decoder,
    notify_decoder,
)

logger = logging.getLogger(__name__)
CompatCheck = Callable[[EngineMetadata], str | None]


class ControlPlane:
    """Handshake + notifications for one engine core's connector."""

    def __init__(self, host: str, handshake_port: int, notify_port: int,
                 compat_check: CompatCheck) -> None:
        self.host = host
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._pull = self._ctx.socket(zmq.PULL)
        self.handshake_port = self._bind(self._router, handshake_port)
        self.notify_port = self._bind(self._pull, notify_port)
        self._compat_check = compat_check
        self.metadata: EngineMetadata | None = None
        self.inbox: queue.SimpleQueue[Notification] = queue.SimpleQueue()
        self.malformed = 0
        self.refused = 0
        self.dropped_sends = 0
        self._push: dict[tuple[str, int], zmq.Socket] = {}
        self._lease_push: dict[tuple[str, int], zmq.Socket] = {}
        self._lease_targets: dict[tuple[str, int], list[str]] = {}
        self.heartbeat_interval_s = 1.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-control", daemon=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kv-hello")

    def _bind(self, sock: zmq.Socket, port: int) -> int:
        sock.setsockopt(zmq.LINGER, 0)
        if port == 0:
            return int(sock.bind_to_random_port(f"tcp://{self.host}"))
        sock.bind(f"tcp://{self.host}:{port}")
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
            for sock, _ in poller.poll(100):
                if sock is self._router:
                    self._answer_hello()
                else:
                    self._receive_notification()
            now = time.monotonic()
            if now - last_lease >= self.heartbeat_interval_s:
                last_lease = now
                self._send_leases()

    def set_leases(self, targets: dict[tuple[str, int], list[str]]) -> None:
        """Engine thread: the live transfers to lease, per peer (swapped in atomically)."""
        self._lease_targets = targets

    def _send_leases(self) -> None:
        assert self.metadata is not None
        for addr, tids in self._lease_targets.items():
            sock = self._lease_push.get(addr)
            if sock is None:
                sock = self._connect_push(addr)
                self._lease_push[addr] = sock
            try:
                sock.send(encoder.encode(Lease(engine_id=self.metadata.engine_id,
                                               transfer_ids=tids)), zmq.NOBLOCK)
            except zmq.Again:
                self.dropped_sends += 1

    def _connect_push(self, addr: tuple[str, int]) -> zmq.Socket:
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.connect(f"tcp://{addr[0]}:{addr[1]}")
        return sock

    def _answer_hello(self) -> None:
        ident, _, raw = self._router.recv_multipart()
        try:
            req = hello_decoder.decode(raw)
            error = (f"control protocol version {req.version} != {CONTROL_VERSION}"
                     if req.version != CONTROL_VERSION else self._compat_check(req.metadata))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            error = f"malformed handshake: {exc}"
        if error is not None:
            self.refused += 1
            logger.error("refused KV handshake: %s", error)
            reply = HandshakeResponse(error=error)
        else:
            reply = HandshakeResponse(metadata=self.metadata)
        self._router.send_multipart([ident, b"", encoder.encode(reply)])

    def _receive_notification(self) -> None:
        raw = self._pull.recv()
        try:
            self.inbox.put(notify_decoder.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.malformed += 1
            logger.warning("ignored a malformed KV notification (%d bytes)", len(raw))

    def drain(self) -> list[Notification]:
        """Every notification received since the last call."""
        out: list[Notification] = []
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def send(self, addr: tuple[str, int], msg: Notification) -> bool:
        """Fire-and-forget notify to a peer (engine thread only); False if dropped."""
        sock = self._push.get(addr)
        if sock is None:
            sock = self._connect_push(addr)
            self._push[addr] = sock
        try:
            sock.send(encoder.encode(msg), zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped_sends += 1
            return False

    def handshake(self, host: str, port: int, timeout_s: float
                  ) -> concurrent.futures.Future[EngineMetadata]:
        """Ask a peer for its metadata; the future fails with a readable error."""
        assert self.metadata is not None
        return self._pool.submit(self._hello, host, port, timeout_s, self.metadata)

    def _hello(self, host: str, port: int, timeout_s: float,
               ours: EngineMetadata) -> EngineMetadata:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(f"tcp://{host}:{port}")
            sock.send(encoder.encode(HandshakeRequest(version=CONTROL_VERSION, metadata=ours)))
            if not sock.poll(int(timeout_s * 1000)):
                raise ConnectionError(f"KV peer {host}:{port} did not answer the handshake "
                                      f"within {timeout_s:.0f} s")
            reply = hello_ack_decoder.decode(sock.recv())
        finally:
            sock.close(linger=0)
        if reply.error is not None or reply.metadata is None:
            raise ConnectionError(f"KV handshake refused by {host}:{port}: {reply.error}")
        error = self._compat_check(reply.metadata)
        if error is not None:
            raise ConnectionError(f"KV peer {host}:{port} is incompatible: {error}")
        return reply.metadata

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
