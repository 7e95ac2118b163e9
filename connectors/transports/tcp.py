"""The project's own KV transport over TCP: no native dependencies.

Each side runs a :class:`TcpServer` on its registered region (READs answered, WRITEs applied,
with no engine code involved) and a :class:`PeerLink` per peer: a bounded pool of connection
threads that run posted batches. A batch is merged (``merge_segments``), and a large one is
split over several connections so the kernel can overlap them. CPU regions move zero-copy
(memoryviews of the tensor storage + ``sendmsg``/``recvmsg_into``); GPU regions are staged
through double-buffered pinned host memory (``tcp_region``).

Failure model: every socket call has a timeout (``io_timeout_s``), a dead peer shows up as a
refused connection, a reset or EOF, a hung one as a timeout; the handle then turns FAILED with
the reason. ``op_timeout_s`` is a last backstop for a batch stuck in the queue.
"""

from __future__ import annotations

import secrets
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from connectors.transports.base import (
    Batch,
    Segment,
    TransferOp,
    TransferStatus,
    Transport,
    TransportError,
    merge_segments,
)
from connectors.transports.handles import HandleTable
from connectors.transports.tcp_peer import LinkSettings, PeerLink
from connectors.transports.tcp_region import Region
from connectors.transports.tcp_server import TcpServer
from connectors.transports.tcp_wire import (
    PROTOCOL_VERSION,
    TcpDescriptor,
    decode_descriptor,
    encode_descriptor,
)
from connectors.transports.validation import build_options, open_batch

MiB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpOptions:
    """Knobs of the tcp transport (all optional in ``make_transport("tcp", ...)``)."""

    port: int = 0
    """Port the server listens on; 0 picks a free one."""
    advertise_host: str | None = None
    """Address peers dial (default: the bind host; for 0.0.0.0, this host name's address)."""
    max_connections_per_peer: int = 4
    """Connection threads (and sockets) per peer; bounds concurrency per peer."""
    split_min_bytes: int = 8 * MiB
    """A batch is spread over k connections when it holds at least k x this many bytes."""
    max_parts_per_batch: int = 2
    """At most this many connections work on one batch (2 measured best on 2 cores)."""
    staging_bytes: int = 16 * MiB
    """Pinned host staging per connection for GPU regions (two halves, double-buffered)."""
    connect_timeout_s: float = 5.0
    """Deadline to open and authenticate one connection."""
    io_timeout_s: float = 10.0
    """Deadline of every single socket send/recv (a stalled peer fails the batch)."""
    op_timeout_s: float | None = 120.0
    """Backstop: a batch still PENDING this long after post is failed by poll."""
    force_staging: bool = False
    """Stage CPU regions too (tests the GPU code path on CPU)."""

    def __post_init__(self) -> None:
        if self.max_connections_per_peer < 1 or self.max_parts_per_batch < 1:
            raise ValueError("max_connections_per_peer and max_parts_per_batch must be >= 1")
        if self.split_min_bytes < 1 or self.staging_bytes < 2:
            raise ValueError("split_min_bytes and staging_bytes must be positive")


def split_segments(segments: Sequence[Segment], num_parts: int) -> list[list[Segment]]:
    """Cut a batch into ``num_parts`` runs of about equal bytes (segments may be split)."""
    total = sum(s.length for s in segments)
    if num_parts <= 1 or total == 0:
        return [list(segments)]
    target = -(-total // num_parts)
    parts: list[list[Segment]] = [[]]
    room = target
    for seg in segments:
        local, remote, length = seg
        while length > 0:
            if room == 0:
                parts.append([])
                room = target
            step = min(length, room)
            parts[-1].append(Segment(local, remote, step))
            local, remote, length, room = local + step, remote + step, length - step, room - step
    return parts


def _advertised(host: str, advertise_host: str | None) -> str:
    """The address a peer can dial: explicit, else the bind host, else this host's name."""
    if advertise_host:
        return advertise_host
    if host in ("", "0.0.0.0", "::"):
        return socket.gethostbyname(socket.gethostname())
    return host


def _ready_event(tensor: torch.Tensor) -> Any:
    """Event on the caller's current stream so staging copies run after its compute."""
    if tensor.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(tensor.device))
    return event


class TcpTransport(Transport):
    """One-sided READ/WRITE over TCP between registered regions."""

    name = "tcp"
    stream_ordered = True
    """post() records an event on the caller's stream; staging waits on it (``_ready_event``)."""

    def __init__(self, *, agent_name: str, host: str = "127.0.0.1",
                 options: TcpOptions | None = None) -> None:
        self._agent_name = agent_name
        self._host = host
        self._opts = options or TcpOptions()
        if self._opts.max_connections_per_peer < 1:
            raise TransportError("max_connections_per_peer must be at least 1")
        self._token = secrets.token_bytes(16)
        self._table = HandleTable(self._opts.op_timeout_s)
        self._lock = threading.Lock()
        self._peers: dict[str, PeerLink] = {}
        self._region: Region | None = None
        self._server: TcpServer | None = None
        self._closed = False

    def register_region(self, tensor: torch.Tensor) -> None:
        """Register the KV tensor and start serving it."""
        if self._region is not None:
            raise TransportError("tcp transport: a region is already registered")
        region = Region(tensor, self._opts.staging_bytes, self._opts.force_staging)
        self._server = TcpServer(region, self._host, self._opts.port, self._token,
                                 self._opts.io_timeout_s)
        self._region = region

    def _require_region(self) -> Region:
        if self._region is None:
            raise TransportError("tcp transport: register_region() must be called first")
        return self._region

    def descriptor(self) -> bytes:
        """msgpack TcpDescriptor: where to dial, the region size and the access token."""
        region = self._require_region()
        assert self._server is not None
        return encode_descriptor(TcpDescriptor(
            transport=self.name, version=PROTOCOL_VERSION, agent_name=self._agent_name,
            host=_advertised(self._host, self._opts.advertise_host), port=self._server.port,
            region_bytes=region.nbytes, token=self._token))

    def add_peer(self, peer_name: str, descriptor: bytes) -> None:
        """Remember a peer; a changed descriptor (peer restarted) replaces the old link."""
        region = self._require_region()
        try:
            desc = decode_descriptor(descriptor)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise TransportError(f"peer {peer_name!r}: not a tcp transport descriptor "
                                 f"({exc})") from exc
        if desc.transport != self.name or desc.version != PROTOCOL_VERSION:
            raise TransportError(f"peer {peer_name!r} speaks {desc.transport} v{desc.version}, "
                                 f"this side tcp v{PROTOCOL_VERSION}")
        with self._lock:
            old = self._peers.get(peer_name)
            if old is not None and old.desc == desc:
                return
            settings = LinkSettings(self._agent_name, self._opts.max_connections_per_peer,
                                    self._opts.connect_timeout_s, self._opts.io_timeout_s)
            self._peers[peer_name] = PeerLink(peer_name, desc, region, self._table, settings)
        if old is not None:
            self._table.fail_peer(peer_name, f"peer {peer_name!r} re-registered")
            old.close()

    def remove_peer(self, peer_name: str) -> None:
        """Forget a peer; its pending batches fail and its connections close."""
        with self._lock:
            link = self._peers.pop(peer_name, None)
        self._table.fail_peer(peer_name, f"peer {peer_name!r} removed")
        if link is not None:
            link.close()

    def post(self, op: TransferOp, peer_name: str, segments: Batch) -> int:
        """Queue a batch; an unknown peer gives a handle that is already FAILED."""
        region = self._require_region()
        with self._lock:
            link = self._peers.get(peer_name)
        merged = merge_segments(segments)
        handle, start = open_batch(self._table, self.name, peer_name, merged, region.nbytes,
                                   None if link is None else link.desc.region_bytes)
        if not start or link is None:
            return handle
        total = sum(s.length for s in merged)
        num_parts = max(1, min(self._opts.max_connections_per_peer,
                               self._opts.max_parts_per_batch,
                               total // max(1, self._opts.split_min_bytes)))
        link.submit(handle, op, split_segments(merged, num_parts),
                    _ready_event(region.tensor))
        return handle

    def poll(self, handle: int) -> TransferStatus:
        """PENDING, DONE or FAILED (never blocks)."""
        return self._table.status(handle)

    def error(self, handle: int) -> str | None:
        """Why a FAILED handle failed."""
        return self._table.error(handle)

    def release(self, handle: int) -> None:
        """Forget a handle; a pending one is cancelled (its sockets are aborted)."""
        self._table.pop(handle)

    def close(self) -> None:
        """Fail pending work, stop every thread, close every socket. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links = list(self._peers.values())
            self._peers.clear()
        self._table.fail_all("tcp transport closed")
        for link in links:
            link.close()
        if self._server is not None:
            self._server.close()


def make_tcp_transport(agent_name: str, host: str, **options: Any) -> TcpTransport:
    """Build a TcpTransport from keyword options (unknown names are a clear error)."""
    return TcpTransport(agent_name=agent_name, host=host,
                        options=build_options(TcpOptions, "tcp", options))


def unavailable_reason() -> str | None:
    """The tcp transport needs nothing beyond the standard library: always usable."""
    return None
