"""Client half of the tcp transport: a bounded pool of connection threads per peer.

``post`` only enqueues; up to ``max_connections_per_peer`` threads per peer each own one
connection and take parts off the peer's queue, so 512 concurrent transfers to a peer use at
most that many threads and sockets. A batch split into parts finishes when every part has;
the first failing part fails the batch.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Any

import msgspec

from connectors.transports.base import Segment, TransferOp, TransferStatus
from connectors.transports.handles import HandleTable
from connectors.transports.tcp_region import Region, RegionIO
from connectors.transports.tcp_wire import (
    PROTOCOL_VERSION,
    PeerClosedError,
    TcpDescriptor,
    TcpHello,
    TcpReply,
    TcpRequest,
    recv_frame,
    send_frame,
    tune_socket,
)

logger = logging.getLogger(__name__)

_IDLE_CHECK_S = 0.5
"""How often an idle connection thread looks at the closed flag."""


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """The subset of transport options a peer link needs."""

    client_name: str
    max_connections: int
    connect_timeout_s: float
    io_timeout_s: float


class _Refused(Exception):
    """The server answered with an error; the connection itself is still in step."""


class _Job:
    """Completion count for one posted batch split into parts."""

    def __init__(self, handle: int, num_parts: int, table: HandleTable) -> None:
        self.handle = handle
        self._remaining = num_parts
        self._table = table
        self._lock = threading.Lock()

    def pending(self) -> bool:
        """Whether the batch still wants work done (not failed, released or timed out)."""
        try:
            return self._table.status(self.handle) is TransferStatus.PENDING
        except KeyError:
            return False

    def part_done(self, error: str | None) -> None:
        """Record one finished part; fail at once on error, DONE after the last part."""
        if error is not None:
            self._table.finish(self.handle, error)
            return
        with self._lock:
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._table.finish(self.handle)


@dataclass(frozen=True, slots=True)
class _Part:
    job: _Job
    op: TransferOp
    segments: list[Segment]
    ready_event: Any


class _Conn:
    """One authenticated connection plus this side's I/O object for it."""

    def __init__(self, sock: socket.socket, io: RegionIO) -> None:
        self.sock = sock
        self.io = io
        self.reused = False

    def abort(self) -> None:
        """Unblock a thread stuck in I/O on this socket (cancel, peer removal)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the socket."""
        self.abort()
        self.sock.close()


class PeerLink:
    """Connection threads and work queue towards one peer."""

    def __init__(self, name: str, desc: TcpDescriptor, region: Region, table: HandleTable,
                 settings: LinkSettings) -> None:
        self.name = name
        self.desc = desc
        self._region = region
        self._table = table
        self._settings = settings
        self._queue: queue.SimpleQueue[_Part | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._live: set[_Conn] = set()

    def submit(self, handle: int, op: TransferOp, parts: list[list[Segment]],
               ready_event: Any) -> None:
        """Queue a batch's parts; never blocks on the network."""
        job = _Job(handle, len(parts), self._table)
        with self._lock:
            # Under the lock so close() either sees these parts in the queue or we see it.
            if self._closed.is_set():
                job.part_done(f"peer {self.name!r} was removed")
                return
            for segments in parts:
                self._queue.put(_Part(job, op, segments, ready_event))
            self._grow_locked(len(parts))

    def _grow_locked(self, num_parts: int) -> None:
        """Start connection threads lazily, up to the per-peer limit (lock held)."""
        self._threads = [t for t in self._threads if t.is_alive()]
        wanted = min(self._settings.max_connections, len(self._threads) + num_parts)
        while len(self._threads) < wanted:
            thread = threading.Thread(target=self._worker, daemon=True,
                                      name=f"tcp-transport-peer-{self.name}")
            self._threads.append(thread)
            thread.start()

    def _worker(self) -> None:
        """Run parts one at a time on this thread's connection."""
        conn: _Conn | None = None
        try:
            while not self._closed.is_set():
                try:
                    part = self._queue.get(timeout=_IDLE_CHECK_S)
                except queue.Empty:
                    continue
                if part is not None and part.job.pending():
                    conn = self._execute(conn, part)
        finally:
            if conn is not None:
                self._forget(conn)

    def _execute(self, conn: _Conn | None, part: _Part) -> _Conn | None:
        """Run one part, reconnecting once if a pooled connection had gone stale."""
        for attempt in range(2):
            try:
                if conn is None:
                    conn = self._connect()
                return self._run_on(conn, part)
            except _Refused as exc:
                part.job.part_done(f"peer {self.name!r} refused: {exc}")
                return conn
            except (OSError, ConnectionError, msgspec.DecodeError) as exc:
                stale = conn is not None and conn.reused and isinstance(
                    exc, PeerClosedError | ConnectionResetError | BrokenPipeError)
                if conn is not None:
                    self._forget(conn)
                conn = None
                if not (attempt == 0 and stale and part.job.pending()):
                    part.job.part_done(_describe(self.name, self.desc, exc))
                    return None
        return None

    def _run_on(self, conn: _Conn, part: _Part) -> _Conn:
        """Do the request with a cancel hook that aborts the socket if the batch is dropped."""
        handle = part.job.handle
        if not self._table.add_cancel_hook(handle, conn.abort):
            return conn
        try:
            self._request(conn, part)
        finally:
            self._table.remove_cancel_hook(handle, conn.abort)
        conn.reused = True
        part.job.part_done(None)
        return conn

    def _request(self, conn: _Conn, part: _Part) -> None:
        """One framed READ or WRITE on ``conn``."""
        offsets = [s.remote_offset for s in part.segments]
        lengths = [s.length for s in part.segments]
        local = [(s.local_offset, s.length) for s in part.segments]
        if part.op is TransferOp.READ:
            send_frame(conn.sock, TcpRequest("read", offsets, lengths))
            _expect_ok(conn.sock)
            conn.io.recv_ranges(conn.sock, local, part.ready_event)
        else:
            send_frame(conn.sock, TcpRequest("write", offsets, lengths))
            conn.io.send_ranges(conn.sock, local, part.ready_event)
            _expect_ok(conn.sock)

    def _connect(self) -> _Conn:
        """Open and authenticate a connection (bounded by connect/io timeouts)."""
        sock = socket.create_connection((self.desc.host, self.desc.port),
                                        timeout=self._settings.connect_timeout_s)
        conn = _Conn(sock, self._region.io_for_connection())
        with self._lock:
            # Tracked before the handshake so close() can unblock a stalled hello too.
            self._live.add(conn)
            if self._closed.is_set():
                conn.abort()
        try:
            tune_socket(sock, self._settings.io_timeout_s)
            send_frame(sock, TcpHello(PROTOCOL_VERSION, self.desc.token,
                                      self._settings.client_name))
            _expect_ok(sock)
        except BaseException:
            self._forget(conn)
            raise
        return conn

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._live.discard(conn)
        conn.close()

    def close(self, join_timeout_s: float = 2.0) -> None:
        """Stop the threads and drop the connections (bounded). Idempotent."""
        with self._lock:
            self._closed.set()
            live, threads = list(self._live), list(self._threads)
        for conn in live:
            conn.abort()
        for _ in threads:
            self._queue.put(None)  # wake idle threads now rather than at their next check
        for thread in threads:
            thread.join(join_timeout_s)
        self._fail_queued()

    def _fail_queued(self) -> None:
        """Parts no thread will run any more fail their batches (nothing stays PENDING)."""
        while True:
            try:
                part = self._queue.get_nowait()
            except queue.Empty:
                return
            if part is not None:
                part.job.part_done(f"peer {self.name!r} was removed")


def _expect_ok(sock: socket.socket) -> None:
    """Read a reply; raise _Refused with the server's reason if it is an error."""
    reply = recv_frame(sock, TcpReply)
    assert isinstance(reply, TcpReply)
    if not reply.ok:
        raise _Refused(reply.error)


def _describe(name: str, desc: TcpDescriptor, exc: BaseException) -> str:
    """A one-line error for a failed batch: which peer, where, what happened."""
    what = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
    return f"tcp transfer to peer {name!r} at {desc.host}:{desc.port} failed: {what}"
