"""Server half of the tcp transport: answers READs from, and applies WRITEs to, one region.

One accept thread, plus one thread per accepted connection. Connections come from peers'
bounded connection pools (``max_connections_per_peer`` each), so the thread count is bounded
by peers x pool size, never by the number of transfers. Before a connection has authenticated
(its hello, with the region's token) it is anyone's: its hello is at most MAX_HELLO_BYTES, it
must arrive within HELLO_TIMEOUT_S however slowly it drips, and at most MAX_PENDING_HELLOS
such connections are served at once (more are closed on accept).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import select
import socket
import threading
import time

from connectors.transports.tcp_region import Region, RegionIO
from connectors.transports.tcp_wire import (
    PROTOCOL_VERSION,
    TcpHello,
    TcpReply,
    TcpRequest,
    drain,
    recv_frame,
    send_frame,
    tune_socket,
)

logger = logging.getLogger(__name__)

_STOP_CHECK_S = 0.5
"""How often idle threads look at the stop flag (bounds close() latency)."""
MAX_HELLO_BYTES = 4096
"""A hello is a version, a 32-byte token and a short name."""
HELLO_TIMEOUT_S = 5.0
"""The whole hello, however it is split, within this (+ up to _STOP_CHECK_S)."""
MAX_PENDING_HELLOS = 64
"""Connections not yet authenticated served at once."""


class TcpServer:
    """Listens on ``host:port`` and serves the registered region to authenticated peers."""

    def __init__(self, region: Region, host: str, port: int, token: bytes,
                 io_timeout_s: float) -> None:
        self._region = region
        self._token = token
        self._io_timeout_s = io_timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._pending_hellos = threading.BoundedSemaphore(MAX_PENDING_HELLOS)
        self._hello_deadlines: dict[socket.socket, float] = {}
        """Connections still to say hello -> when the accept loop cuts them."""
        self._threads: list[threading.Thread] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
        except OSError as exc:
            self._listener.close()
            raise OSError(f"tcp transport cannot listen on {host}:{port}: {exc}") from exc
        self._listener.listen(128)
        self._listener.settimeout(_STOP_CHECK_S)
        self.port: int = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"tcp-transport-accept-{self.port}")
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        """Accept connections until stopped; each gets its own handler thread."""
        while not self._stop.is_set():
            self._cut_late_hellos()
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break  # listener closed
            if not self._pending_hellos.acquire(blocking=False):
                logger.warning("tcp transport: %d connections are still to say hello; closing "
                               "a new one", MAX_PENDING_HELLOS)
                conn.close()
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                      name=f"tcp-transport-conn-{self.port}")
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    break
                self._conns.add(conn)
                self._hello_deadlines[conn] = time.monotonic() + HELLO_TIMEOUT_S
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _cut_late_hellos(self) -> None:
        """End the connections whose hello is late (their blocked recv returns at once);
        the accept loop runs this at least every _STOP_CHECK_S."""
        now = time.monotonic()
        with self._lock:  # under the lock: a hello that just finished is not cut after it
            for conn in [c for c, t in self._hello_deadlines.items() if t <= now]:
                del self._hello_deadlines[conn]
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _serve(self, conn: socket.socket) -> None:
        """Authenticate, then answer requests until the peer leaves or we stop."""
        try:
            try:
                tune_socket(conn, self._io_timeout_s)
                if not self._handshake(conn):
                    return
            finally:
                with self._lock:
                    self._hello_deadlines.pop(conn, None)
                self._pending_hellos.release()
            io = self._region.io_for_connection()
            while self._wait_request(conn):
                request = recv_frame(conn, TcpRequest)
                assert isinstance(request, TcpRequest)
                self._handle(conn, io, request)
        except (OSError, ConnectionError, ValueError) as exc:
            logger.debug("tcp transport connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket) -> bool:
        """Check the peer's hello (protocol version and shared token)."""
        hello = recv_frame(conn, TcpHello, MAX_HELLO_BYTES)
        assert isinstance(hello, TcpHello)
        if hello.version != PROTOCOL_VERSION:
            send_frame(conn, TcpReply(False, f"protocol version {hello.version} != "
                                             f"{PROTOCOL_VERSION}"))
            return False
        if not hmac.compare_digest(hello.token, self._token):
            send_frame(conn, TcpReply(False, "wrong token: stale or foreign descriptor"))
            return False
        send_frame(conn, TcpReply(True))
        return True

    def _wait_request(self, conn: socket.socket) -> bool:
        """Wait for the next request, waking regularly to notice a stop; False = stop."""
        while not self._stop.is_set():
            readable, _, _ = select.select([conn], [], [], _STOP_CHECK_S)
            if readable:
                return True
        return False

    def _handle(self, conn: socket.socket, io: RegionIO, request: TcpRequest) -> None:
        """Serve one READ or WRITE request."""
        ranges = list(zip(request.remote_offsets, request.lengths, strict=False))
        problem = self._region.check(request.remote_offsets, request.lengths)
        if request.op == "read":
            if problem is not None:
                send_frame(conn, TcpReply(False, problem))
                return
            send_frame(conn, TcpReply(True))
            io.send_ranges(conn, ranges)
        elif request.op == "write":
            if problem is not None:
                if any(n < 0 for n in request.lengths):
                    raise ValueError("negative length in a write request")
                drain(conn, sum(request.lengths))
                send_frame(conn, TcpReply(False, problem))
                return
            io.recv_ranges(conn, ranges)
            send_frame(conn, TcpReply(True))
        else:
            raise ValueError(f"unknown op {request.op!r}")

    def close(self, join_timeout_s: float = 2.0) -> None:
        """Stop accepting, drop every connection, join threads (bounded). Idempotent."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
        self._listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._accept_thread.join(join_timeout_s)
        for thread in threads:
            thread.join(join_timeout_s)
