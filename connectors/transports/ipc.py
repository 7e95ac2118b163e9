"""Same-host GPU peer copies through CUDA/HIP IPC handles (what MoRI-IO's XGMI backend does).

Each side exports its KV tensor's allocation with ``UntypedStorage._share_cuda_()`` (on ROCm
builds this is ``hipIpcGetMemHandle``); the descriptor carries those fields as plain bytes and
ints (msgpack, no pickle). ``add_peer`` opens the handle with
``UntypedStorage._new_shared_cuda(...)`` and wraps it as a uint8 tensor, so a READ is
``local[lo:lo+n] <- remote[ro:ro+n]`` and a WRITE the reverse, over NVLink / xGMI (or inside
one GPU).

How a batch of runs is copied (option ``copy``: batch, kernel, runtime, torch) and what
each measured is in ``ipc_copy``. Copies are issued on dedicated streams after the caller's
current stream, and completion is a CUDA event per batch, so ``post`` returns at once and
``poll`` is ``event.query()``.

Limits: both processes must be on one host and see both GPUs (the peer's device is found by
UUID, so CUDA_VISIBLE_DEVICES may order them differently, but must not hide one). A dead peer
cannot be detected here: its memory stays mapped until we close the handle; the connector's
control plane (heartbeats) notices dead peers.
"""

from __future__ import annotations

import logging
import os
import socket
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
    merge_array,
)
from connectors.transports.gpu_runtime import enable_peer_access
from connectors.transports.handles import HandleTable
from connectors.transports.ipc_copy import COPY_MODES, ISSUE_SIDES, STREAM_MIN_BYTES, PeerCopier
from connectors.transports.validation import build_options, open_batch
from disagg.common import platform
from disagg.common.platform import PlatformKind

logger = logging.getLogger(__name__)

DESCRIPTOR_VERSION = 1


class IpcDescriptor(msgspec.Struct, frozen=True):
    """The fields of ``_share_cuda_()`` plus where the region sits in the allocation."""

    transport: str
    version: int
    agent_name: str
    hostname: str
    pid: int
    device_index: int
    device_uuid: str | None
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    region_offset_bytes: int
    """Byte offset of the KV tensor inside the shared storage."""
    region_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class IpcOptions:
    """Knobs of the ipc transport."""

    op_timeout_s: float | None = 120.0
    """Backstop: a batch still PENDING this long after post is failed by poll."""
    copy: str = "auto"
    """``batch``: batched copy-engine calls; ``kernel``: one Triton launch per batch;
    ``runtime``: a runtime memcpy per run; ``torch``: a torch ``copy_`` per run; ``auto``:
    ``batch`` where the driver has it, else ``kernel`` (see ``ipc_copy``)."""
    streams: int = 8
    """Copy streams on the source GPU for ``batch`` and ``runtime``."""
    stream_min_bytes: int = STREAM_MIN_BYTES
    """A batch takes one more of those streams for each this many bytes."""
    issue_on: str = "local"
    """Whose copy engines run ``batch`` / ``runtime`` copies: ``local`` (this process's GPU:
    the cheapest to issue from, measured), ``source`` (push) or ``destination`` (pull)."""

    def __post_init__(self) -> None:
        if self.copy not in COPY_MODES:
            raise ValueError(f"ipc option copy={self.copy!r}: expected one of {COPY_MODES}")
        if self.issue_on not in ISSUE_SIDES:
            raise ValueError(f"ipc option issue_on={self.issue_on!r}: expected one of "
                             f"{ISSUE_SIDES}")
        for name in ("streams", "stream_min_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ipc option {name} must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class _Peer:
    desc: IpcDescriptor
    remote: torch.Tensor
    """uint8 view of the peer's region, opened from its IPC handle."""


def unavailable_reason() -> str | None:
    """None when torch sees a GPU and can share its memory across processes."""

    if platform.current_platform().kind is PlatformKind.CPU:
        return ("no CUDA/HIP GPU visible to torch: the ipc transport copies GPU memory "
                "between processes on one host")
    if not hasattr(torch.UntypedStorage, "_new_shared_cuda"):
        return f"torch {torch.__version__} lacks UntypedStorage._new_shared_cuda"
    return None


def _device_uuid(index: int) -> str | None:
    """A stable identity of a GPU across processes (None if torch does not expose one)."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return None if uuid is None else str(uuid)


def _local_index(desc: IpcDescriptor) -> int:
    """This process's index for the peer's GPU, matched by UUID when available."""
    if desc.device_uuid is None:
        return desc.device_index
    for index in range(torch.cuda.device_count()):
        if _device_uuid(index) == desc.device_uuid:
            return index
    raise TransportError(f"peer {desc.agent_name!r}'s GPU {desc.device_uuid} is not visible "
                         "in this process: both engines must see both GPUs "
                         "(CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES)")


def _open_remote(desc: IpcDescriptor) -> torch.Tensor:
    """Map the peer's allocation and view its region as uint8."""
    index = _local_index(desc)
    storage = torch.UntypedStorage._new_shared_cuda(  # type: ignore[attr-defined]
        index, desc.storage_handle, desc.storage_size_bytes, desc.storage_offset_bytes,
        desc.ref_counter_handle, desc.ref_counter_offset, desc.event_handle,
        desc.event_sync_required)
    view = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", index))
    return view.set_(storage, desc.region_offset_bytes, (desc.region_bytes,), (1,))


class IpcTransport(Transport):
    """One-sided GPU copies into / out of a peer's IPC-mapped region."""

    name = "ipc"
    stream_ordered = True

    def __init__(self, *, agent_name: str, options: IpcOptions | None = None) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise TransportError(reason)
        self._agent_name = agent_name
        self._opts = options or IpcOptions()
        self._table = HandleTable(self._opts.op_timeout_s)
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._region: torch.Tensor | None = None
        self._closed = False
        self._copier = PeerCopier(self._opts.copy, self._opts.streams, self._opts.stream_min_bytes,
                                   issue_on=self._opts.issue_on)

    @property
    def copy_mode(self) -> str:
        """The copy path in use (``auto`` resolved; after a fallback, the fallback)."""
        return self._copier.mode

    def register_region(self, tensor: torch.Tensor) -> None:
        """Register the KV tensor (must live on a GPU)."""
        if self._region is not None:
            raise TransportError("ipc transport: a region is already registered")
        if tensor.device.type != "cuda":
            raise TransportError(f"ipc transport needs a GPU tensor, got one on {tensor.device}")
        if not tensor.is_contiguous():
            raise TransportError("ipc transport: the KV tensor must be contiguous")
        self._region = tensor.detach().reshape(-1).view(torch.uint8)

    def _require_region(self) -> torch.Tensor:
        if self._region is None:
            raise TransportError("ipc transport: register_region() must be called first")
        return self._region

    def descriptor(self) -> bytes:
        """msgpack IpcDescriptor of the region's allocation."""
        region = self._require_region()
        storage = region.untyped_storage()
        (device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle,
         event_sync) = storage._share_cuda_()  # type: ignore[attr-defined]
        index = int(device)
        return msgspec.msgpack.encode(IpcDescriptor(
            transport=self.name, version=DESCRIPTOR_VERSION, agent_name=self._agent_name,
            hostname=socket.gethostname(), pid=os.getpid(), device_index=index,
            device_uuid=_device_uuid(index), storage_handle=bytes(handle),
            storage_size_bytes=int(size_bytes), storage_offset_bytes=int(offset_bytes),
            ref_counter_handle=bytes(ref_handle), ref_counter_offset=int(ref_offset),
            event_handle=bytes(event_handle or b""), event_sync_required=bool(event_sync),
            region_offset_bytes=int(region.storage_offset()), region_bytes=region.numel()))

    def add_peer(self, peer_name: str, descriptor: bytes) -> None:
        """Open the peer's IPC handle; a changed descriptor replaces the old mapping."""
        self._require_region()
        try:
            desc = msgspec.msgpack.decode(descriptor, type=IpcDescriptor)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise TransportError(f"peer {peer_name!r}: not an ipc descriptor ({exc})") from exc
        if desc.transport != self.name or desc.version != DESCRIPTOR_VERSION:
            raise TransportError(f"peer {peer_name!r} sent a {desc.transport} v{desc.version} "
                                 f"descriptor, expected ipc v{DESCRIPTOR_VERSION}")
        if desc.hostname != socket.gethostname():
            raise TransportError(f"ipc transport needs both engines on one host; peer "
                                 f"{peer_name!r} is on {desc.hostname!r}")
        with self._lock:
            old = self._peers.get(peer_name)
            if old is not None and old.desc == desc:
                return
            if old is not None:
                self._drop_peer(peer_name, "re-registered")
            remote = _open_remote(desc)
            enable_peer_access(self._require_region().device, remote.device)
            self._peers[peer_name] = _Peer(desc, remote)

    def _drop_peer(self, peer_name: str, why: str) -> None:
        """Wait out in-flight copies touching the mapping, fail them, unmap (lock held)."""
        for handle in self._table.fail_peer(peer_name, f"peer {peer_name!r} {why}"):
            event = self._table.get(handle).context
            if event is not None:
                event.synchronize()  # never unmap memory a copy engine is still using
        self._peers.pop(peer_name, None)

    def remove_peer(self, peer_name: str) -> None:
        """Forget a peer and close its IPC mapping; its pending batches fail."""
        with self._lock:
            self._drop_peer(peer_name, "removed")

    def post(self, op: TransferOp, peer_name: str, segments: Batch) -> int:
        """Queue the copies on the copy streams; completion is one event."""
        region = self._require_region()
        merged = merge_array(segments)
        with self._lock:
            peer = self._peers.get(peer_name)
            handle, start = open_batch(self._table, self.name, peer_name, merged, region.numel(),
                                       None if peer is None else peer.remote.numel())
            if not start or peer is None:
                return handle
            try:
                write = op is TransferOp.WRITE
                event = self._copier.issue(region if write else peer.remote,
                                           peer.remote if write else region, merged,
                                           src_is_local=write)
            except RuntimeError as exc:
                self._table.finish(handle, f"ipc {op.value} to {peer_name!r} failed: {exc}")
                return handle
            self._table.get(handle).context = event
        return handle

    def poll(self, handle: int) -> TransferStatus:
        """DONE once the batch's event has completed."""
        state = self._table.get(handle)
        if state.status is TransferStatus.PENDING:
            if state.context is None:
                self._table.finish(handle)  # empty batch
            else:
                try:
                    if state.context.query():
                        self._table.finish(handle)
                except RuntimeError as exc:
                    self._table.finish(handle, f"ipc copy to {state.peer_name!r} failed: {exc}")
        return self._table.status(handle)

    def error(self, handle: int) -> str | None:
        """Why a FAILED handle failed."""
        return self._table.error(handle)

    def release(self, handle: int) -> None:
        """Forget a handle (GPU copies already issued still complete)."""
        self._table.pop(handle)

    def close(self) -> None:
        """Fail pending batches, wait for in-flight copies, close every IPC mapping."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for name in list(self._peers):
                self._drop_peer(name, "closed")
            self._table.fail_all("ipc transport closed")
            self._copier.synchronize()


def make_ipc_transport(agent_name: str, host: str, **options: Any) -> IpcTransport:
    """Build an IpcTransport (``host`` is unused: peers must be on this host)."""
    return IpcTransport(agent_name=agent_name, options=build_options(IpcOptions, "ipc", options))
