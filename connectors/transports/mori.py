"""KV transport over AMD MoRI-IO (``mori.io``): RDMA between nodes, XGMI inside one.

Real ``mori.io`` calls used (ROCm/mori ``python/mori/io/engine.py``)::

    IOEngine(key, IOEngineConfig(host=..., port=...))
    engine.create_backend(BackendType.RDMA, RdmaBackendConfig(qp_per_transfer, post_batch_size,
                          num_worker_threads, PollCqMode.POLLING, enable_notification=False))
    engine.create_backend(BackendType.XGMI, XgmiBackendConfig(num_streams, num_events))
    engine.get_engine_desc().pack() / EngineDesc.unpack(raw)
    engine.register_torch_tensor(tensor) -> MemoryDesc; .pack() / MemoryDesc.unpack(raw)
    engine.register_remote_engine(desc) / engine.deregister_remote_engine(desc)
    engine.create_session(local_mem, remote_mem) -> IOEngineSession | None
    session.allocate_transfer_uid()
    session.batch_read(local_offsets, remote_offsets, sizes, uid) -> TransferStatus
    session.batch_write(local_offsets, remote_offsets, sizes, uid) -> TransferStatus
    status.Succeeded() / status.Failed() / status.Code() / status.Message()
    engine.deregister_memory(mem_desc)

Notifications are off (``enable_notification=False``, as vLLM's MoRIIO connector does): the
P/D connector's own control plane says when a transfer is done. The CPU tests' fake
(tests/connectors/transports/fake_mori.py) implements the same names and semantics on host
memory; ``make_transport("mori", ..., api_module="fake_mori")`` runs this module against it.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from connectors.transports.base import (
    Batch,
    TransferOp,
    TransferStatus,
    Transport,
    TransportError,
    merge_segments,
)
from connectors.transports.handles import HandleTable
from connectors.transports.validation import build_options, open_batch

logger = logging.getLogger(__name__)

DESCRIPTOR_VERSION = 1


class MoriDescriptor(msgspec.Struct, frozen=True):
    """mori's own packed EngineDesc and MemoryDesc, plus the region size."""

    transport: str
    version: int
    agent_name: str
    engine_desc: bytes
    mem_desc: bytes
    region_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MoriOptions:
    """Knobs of the mori transport."""

    backend: str = "rdma"
    """``rdma`` (between nodes, or within one) or ``xgmi`` (GPU peers in one node)."""
    port: int = 0
    """Port of the engine's control channel; 0 picks a free one."""
    qp_per_transfer: int = 1
    post_batch_size: int = -1
    num_worker_threads: int = 1
    xgmi_num_streams: int = 64
    api_module: str = "mori.io"
    """Import path of the MoRI-IO API (tests point it at their host-memory fake)."""
    op_timeout_s: float | None = 120.0
    """Backstop: a batch still PENDING this long after post is failed by poll."""


@dataclass(slots=True)
class _Peer:
    desc: MoriDescriptor
    engine_desc: Any
    session: Any


def _import_mori(name: str = "mori.io") -> Any:
    """The MoRI-IO API module, or a TransportError saying what is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise TransportError(f"mori.io is not importable ({exc}): the mori transport needs "
                             "AMD MoRI built with IO support (ROCm + RDMA or XGMI)") from exc


def unavailable_reason() -> str | None:
    """None when the real ``mori.io`` imports, else why not."""
    try:
        _import_mori()
    except TransportError as exc:
        return str(exc)
    return None


def _create_backend(api: Any, engine: Any, opts: MoriOptions) -> None:
    """RDMA or XGMI backend per the options."""
    if opts.backend == "xgmi":
        engine.create_backend(api.BackendType.XGMI,
                              api.XgmiBackendConfig(num_streams=opts.xgmi_num_streams,
                                                    num_events=opts.xgmi_num_streams))
    elif opts.backend == "rdma":
        engine.create_backend(api.BackendType.RDMA, api.RdmaBackendConfig(
            opts.qp_per_transfer, opts.post_batch_size, opts.num_worker_threads,
            api.PollCqMode.POLLING, enable_notification=False))
    else:
        raise TransportError(f"mori backend must be 'rdma' or 'xgmi', not {opts.backend!r}")


class MoriTransport(Transport):
    """One-sided READ/WRITE through a MoRI-IO engine session per peer."""

    name = "mori"

    def __init__(self, *, agent_name: str, host: str = "127.0.0.1",
                 options: MoriOptions | None = None) -> None:
        self._opts = options or MoriOptions()
        self._api = _import_mori(self._opts.api_module)
        self._agent_name = agent_name
        self._engine: Any = self._api.IOEngine(agent_name,
                                               self._api.IOEngineConfig(host, self._opts.port))
        _create_backend(self._api, self._engine, self._opts)
        self._lock = threading.Lock()
        self._table = HandleTable(self._opts.op_timeout_s)
        self._peers: dict[str, _Peer] = {}
        self._mem: Any = None
        self._tensor: torch.Tensor | None = None
        self._region_bytes = 0
        self._closed = False

    def register_region(self, tensor: torch.Tensor) -> None:
        """Register the KV tensor with the engine (host or GPU memory)."""
        if self._mem is not None:
            raise TransportError("mori transport: a region is already registered")
        if not tensor.is_contiguous():
            raise TransportError("mori transport: the KV tensor must be contiguous")
        with self._lock:
            self._mem = self._engine.register_torch_tensor(tensor)
        self._tensor = tensor  # held so the registered memory outlives every transfer
        self._region_bytes = tensor.numel() * tensor.element_size()

    def _require_mem(self) -> Any:
        if self._mem is None:
            raise TransportError("mori transport: register_region() must be called first")
        return self._mem

    def descriptor(self) -> bytes:
        """msgpack MoriDescriptor carrying mori's packed EngineDesc and MemoryDesc."""
        mem = self._require_mem()
        return msgspec.msgpack.encode(MoriDescriptor(
            transport=self.name, version=DESCRIPTOR_VERSION, agent_name=self._agent_name,
            engine_desc=bytes(self._engine.get_engine_desc().pack()),
            mem_desc=bytes(mem.pack()), region_bytes=self._region_bytes))

    def add_peer(self, peer_name: str, descriptor: bytes) -> None:
        """Register the peer engine and open a session to its region."""
        mem = self._require_mem()
        try:
            desc = msgspec.msgpack.decode(descriptor, type=MoriDescriptor)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise TransportError(f"peer {peer_name!r}: not a mori descriptor ({exc})") from exc
        if desc.transport != self.name or desc.version != DESCRIPTOR_VERSION:
            raise TransportError(f"peer {peer_name!r} sent a {desc.transport} v{desc.version} "
                                 f"descriptor, expected mori v{DESCRIPTOR_VERSION}")
        with self._lock:
            old = self._peers.get(peer_name)
            if old is not None and old.desc == desc:
                return
            if old is not None:
                self._drop_peer(peer_name, "re-registered")
            engine_desc = self._api.EngineDesc.unpack(desc.engine_desc)
            self._engine.register_remote_engine(engine_desc)
            session = self._engine.create_session(mem, self._api.MemoryDesc.unpack(desc.mem_desc))
            if session is None:
                self._engine.deregister_remote_engine(engine_desc)
                raise TransportError(f"mori could not open a session to peer {peer_name!r}")
            self._peers[peer_name] = _Peer(desc, engine_desc, session)

    def _drop_peer(self, peer_name: str, why: str) -> None:
        """Fail the peer's batches and deregister its engine (lock held)."""
        self._table.fail_peer(peer_name, f"peer {peer_name!r} {why}")
        peer = self._peers.pop(peer_name, None)
        if peer is not None:
            self._engine.deregister_remote_engine(peer.engine_desc)

    def remove_peer(self, peer_name: str) -> None:
        """Forget a peer; its pending batches fail."""
        with self._lock:
            self._drop_peer(peer_name, "removed")

    def post(self, op: TransferOp, peer_name: str, segments: Batch) -> int:
        """One ``batch_read`` / ``batch_write`` on the peer's session."""
        self._require_mem()
        merged = merge_segments(segments)
        with self._lock:
            peer = self._peers.get(peer_name)
            handle, start = open_batch(self._table, self.name, peer_name, merged,
                                       self._region_bytes,
                                       None if peer is None else peer.desc.region_bytes)
            if not start or peer is None:
                return handle
            session = peer.session
            call = session.batch_read if op is TransferOp.READ else session.batch_write
            status = call([s.local_offset for s in merged], [s.remote_offset for s in merged],
                          [s.length for s in merged], session.allocate_transfer_uid())
            self._table.get(handle).context = status
        self._apply(handle, status)
        return handle

    def _apply(self, handle: int, status: Any) -> None:
        """Map a mori TransferStatus onto the handle."""
        if status.Succeeded():
            self._table.finish(handle)
        elif status.Failed():
            peer = self._table.get(handle).peer_name
            self._table.finish(handle, f"mori transfer to peer {peer!r} failed: "
                                       f"{status.Code()}: {status.Message()}")

    def poll(self, handle: int) -> TransferStatus:
        """PENDING while mori reports INIT/IN_PROGRESS, then DONE or FAILED."""
        state = self._table.get(handle)
        if state.status is TransferStatus.PENDING and state.context is not None:
            self._apply(handle, state.context)
        return self._table.status(handle)

    def error(self, handle: int) -> str | None:
        """Why a FAILED handle failed."""
        return self._table.error(handle)

    def release(self, handle: int) -> None:
        """Forget a handle (mori has no cancel: a running transfer still completes)."""
        self._table.pop(handle)

    def close(self) -> None:
        """Fail pending batches, deregister peers and memory, drop the engine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for name in list(self._peers):
                self._drop_peer(name, "closed")
            self._table.fail_all("mori transport closed")
            if self._mem is not None:
                self._engine.deregister_memory(self._mem)
            # The engine frees its backend, threads and listener when destroyed.
            self._engine = None


def make_mori_transport(agent_name: str, host: str, **options: Any) -> MoriTransport:
    """Build a MoriTransport from keyword options."""
    return MoriTransport(agent_name=agent_name, host=host,
                         options=build_options(MoriOptions, "mori", options))
