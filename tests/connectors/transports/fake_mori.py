"""A host-memory stand-in for AMD MoRI-IO's Python API (``mori.io``), for CPU tests.

It mirrors the names and semantics of ``mori.io`` as found in ROCm/mori
(``python/mori/io/engine.py`` and ``src/pybind/pybind_io.cpp``):

* ``IOEngine(key, IOEngineConfig(host, port))``, ``create_backend(BackendType, config)``,
  ``get_engine_desc()``, ``register_remote_engine`` / ``deregister_remote_engine``,
  ``register_torch_tensor`` / ``register_memory(ptr, size, device_id, loc)`` /
  ``deregister_memory``, ``allocate_transfer_uid``, ``read`` / ``write`` / ``batch_read`` /
  ``batch_write`` (engine level: mem descs + offsets; batch calls return one status per
  entry, as in the newer releases), ``create_session(local_mem, remote_mem)`` ->
  ``IOEngineSession`` (``read`` / ``write`` / ``batch_read`` / ``batch_write`` with offsets
  only, one ``TransferStatus`` per call; ``alive``), ``pop_inbound_transfer_status``.
* ``TransferStatus`` with ``Code() Message() Init() InProgress() Succeeded() Failed()
  SetCode() SetMessage() Wait() WaitFor(timeout_ms)``; ``StatusCode``, ``BackendType``,
  ``MemoryLocationType``, ``PollCqMode``, ``RdmaBackendConfig``, ``XgmiBackendConfig``.
* ``EngineDesc`` / ``MemoryDesc`` with ``pack()`` -> msgpack bytes and static ``unpack``.

How it moves bytes: like RDMA, one-sided and without the target's help. The engine copies
with ``process_vm_readv`` / ``process_vm_writev`` (Linux cross-memory attach, what UCX's cma
transport uses) into the pid and address named by the peer's descriptors, on worker threads,
so calls return IN_PROGRESS and complete later. A dead target turns into ``ERR_RDMA_OP``.
Inbound notifications travel over a small TCP listener at the engine's host:port, as the real
engine's control channel does. Host (CPU) memory only.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import socket
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
from fake_mori_types import (
    BackendType,
    EngineDesc,
    IOEngineConfig,
    MemoryDesc,
    MemoryLocationType,
    PollCqMode,
    RdmaBackendConfig,
    StatusCode,
    TcpBackendConfig,
    TransferStatus,
    XgmiBackendConfig,
    _EngineDescWire,
    _MemoryDescWire,
    set_log_level,
)

__all__ = [
    "BackendType",
    "EngineDesc",
    "IOEngine",
    "IOEngineConfig",
    "IOEngineSession",
    "MemoryDesc",
    "MemoryLocationType",
    "PollCqMode",
    "RdmaBackendConfig",
    "StatusCode",
    "TcpBackendConfig",
    "TransferStatus",
    "XgmiBackendConfig",
    "set_log_level",
]

_libc = ctypes.CDLL(None, use_errno=True)
_IOV_MAX = 512


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _iovecs(pairs: Sequence[tuple[int, int]]) -> ctypes.Array[_Iovec]:
    """A C array of iovecs for (address, length) pairs."""
    return (_Iovec * len(pairs))(*[_Iovec(addr, length) for addr, length in pairs])


def _cross_copy(pid: int, local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]],
                write: bool) -> None:
    """Copy (addr, len) lists between this process and ``pid``; OSError on failure."""
    if pid == os.getpid():
        for (la, n), (ra, _) in zip(local, remote, strict=True):
            ctypes.memmove(ra, la, n) if write else ctypes.memmove(la, ra, n)
        return
    call = _libc.process_vm_writev if write else _libc.process_vm_readv
    for start in range(0, len(local), _IOV_MAX):
        lv = _iovecs(local[start:start + _IOV_MAX])
        rv = _iovecs(remote[start:start + _IOV_MAX])
        expected = sum(n for _, n in local[start:start + _IOV_MAX])
        moved = call(pid, lv, len(lv), rv, len(rv), 0)
        if moved < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{'process_vm_writev' if write else 'process_vm_readv'} "
                               f"to pid {pid}: {os.strerror(err)}")
        if moved != expected:
            raise OSError(f"short cross-process copy: {moved} of {expected} bytes")


class _NotifyListener:
    """Receives inbound transfer notifications; holds no reference to its engine."""

    _FRAME = struct.Struct("<I")

    def __init__(self, host: str, port: int) -> None:
        self.inbound: dict[tuple[str, int], TransferStatus] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.create_server((host, port))
        self._sock.settimeout(0.5)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._loop, daemon=True, name="fake-mori-notify").start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    self._receive(conn)
                except (OSError, msgspec.DecodeError):
                    continue

    def _receive(self, conn: socket.socket) -> None:
        (size,) = self._FRAME.unpack(conn.recv(self._FRAME.size, socket.MSG_WAITALL))
        key, uid, code, message = msgspec.msgpack.decode(conn.recv(size, socket.MSG_WAITALL))
        status = TransferStatus()
        status.Update(StatusCode(code), message)
        with self.lock:
            self.inbound[(key, uid)] = status

    def pop(self, key: str, uid: int) -> TransferStatus | None:
        with self.lock:
            return self.inbound.pop((key, uid), None)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    @classmethod
    def send(cls, host: str, port: int, payload: list[Any]) -> None:
        """Best-effort notification to a target engine (bounded by a 2 s timeout)."""
        body = msgspec.msgpack.encode(payload)
        try:
            with socket.create_connection((host, port), timeout=2.0) as conn:
                conn.sendall(cls._FRAME.pack(len(body)) + body)
        except OSError:
            pass


def _in_bounds(mem: MemoryDesc, offsets: Sequence[int], sizes: Sequence[int]) -> bool:
    return all(o >= 0 and n >= 0 and o + n <= mem.size for o, n in zip(offsets, sizes,
                                                                      strict=True))


class IOEngine:
    """One engine: registered memory, known remote engines, one-sided transfers."""

    def __init__(self, key: str, config: IOEngineConfig) -> None:
        self._key = key
        self._lock = threading.Lock()
        self._uids = itertools.count(1)
        self._mem_ids = itertools.count(1)
        self._mems: dict[int, MemoryDesc] = {}
        self._remotes: dict[str, EngineDesc] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._notify = True
        host = config.host or "127.0.0.1"
        self._listener = _NotifyListener(host, config.port)
        self._desc = EngineDesc(_EngineDescWire(key, socket.gethostname(), socket.gethostname(),
                                                host, self._listener.port, os.getpid()))

    def __del__(self) -> None:
        listener = getattr(self, "_listener", None)
        if listener is not None:
            listener.close()
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)  # type: ignore[union-attr]

    def get_engine_desc(self) -> EngineDesc:
        """This engine's descriptor (send ``pack()`` to peers)."""
        return self._desc

    def create_backend(self, type: BackendType, config: Any = None) -> None:
        """Start the backend's worker threads."""
        workers = getattr(config, "num_worker_threads", -1)
        self._notify = bool(getattr(config, "enable_notification", True))
        self._pool = ThreadPoolExecutor(max_workers=workers if workers > 0 else 2,
                                        thread_name_prefix=f"fake-mori-{self._key}")

    def remove_backend(self, type: BackendType) -> None:
        """Stop the backend."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def register_remote_engine(self, engine_desc: EngineDesc) -> None:
        """Make a peer engine addressable."""
        with self._lock:
            self._remotes[engine_desc.key] = engine_desc

    def deregister_remote_engine(self, engine_desc: EngineDesc) -> None:
        """Forget a peer engine."""
        with self._lock:
            self._remotes.pop(engine_desc.key, None)

    def register_memory(self, ptr: int, size: int, device_id: int,
                        mem_loc: MemoryLocationType) -> MemoryDesc:
        """Register a buffer by address (host memory only in the fake)."""
        if mem_loc is not MemoryLocationType.CPU:
            raise RuntimeError("fake mori moves host memory only; GPU needs the real mori")
        with self._lock:
            desc = MemoryDesc(_MemoryDescWire(self._key, next(self._mem_ids), device_id, "",
                                              int(ptr), int(size), mem_loc.value, b""))
            self._mems[desc.id] = desc
        return desc

    def register_torch_tensor(self, tensor: Any) -> MemoryDesc:
        """Register a contiguous tensor's bytes."""
        if not tensor.is_contiguous():
            raise RuntimeError("input tensor must be contiguous")
        loc = MemoryLocationType.CPU if tensor.device.type == "cpu" else MemoryLocationType.GPU
        index = tensor.device.index
        return self.register_memory(tensor.data_ptr(), tensor.nelement() * tensor.element_size(),
                                    -1 if index is None else index, loc)

    def deregister_memory(self, mem_desc: MemoryDesc) -> None:
        """Forget a registered buffer."""
        with self._lock:
            self._mems.pop(mem_desc.id, None)

    def allocate_transfer_uid(self) -> int:
        """A fresh transfer id (unique per engine)."""
        with self._lock:
            return next(self._uids)

    def read(self, local_dest_mem_desc: MemoryDesc, local_offset: int,
             remote_src_mem_desc: MemoryDesc, remote_offset: int, size: int,
             transfer_uid: int) -> TransferStatus:
        """One-sided read of ``size`` bytes."""
        return self._submit(local_dest_mem_desc, [local_offset], remote_src_mem_desc,
                            [remote_offset], [size], transfer_uid, write=False)[0]

    def write(self, local_src_mem_desc: MemoryDesc, local_offset: int,
              remote_dest_mem_desc: MemoryDesc, remote_offset: int, size: int,
              transfer_uid: int) -> TransferStatus:
        """One-sided write of ``size`` bytes."""
        return self._submit(local_src_mem_desc, [local_offset], remote_dest_mem_desc,
                            [remote_offset], [size], transfer_uid, write=True)[0]

    def batch_read(self, local_mem: MemoryDesc, local_offsets: Sequence[int],
                   remote_mem: MemoryDesc, remote_offsets: Sequence[int],
                   sizes: Sequence[int], transfer_uid: int) -> list[TransferStatus]:
        """Batched reads; one status per entry."""
        return self._submit(local_mem, local_offsets, remote_mem, remote_offsets, sizes,
                            transfer_uid, write=False, per_entry=True)

    def batch_write(self, local_mem: MemoryDesc, local_offsets: Sequence[int],
                    remote_mem: MemoryDesc, remote_offsets: Sequence[int],
                    sizes: Sequence[int], transfer_uid: int) -> list[TransferStatus]:
        """Batched writes; one status per entry."""
        return self._submit(local_mem, local_offsets, remote_mem, remote_offsets, sizes,
                            transfer_uid, write=True, per_entry=True)

    def create_session(self, local_mem: MemoryDesc,
                       remote_mem: MemoryDesc) -> IOEngineSession | None:
        """A session bound to one local and one remote buffer (None if either is unknown)."""
        with self._lock:
            known = local_mem.id in self._mems and remote_mem.engine_key in self._remotes
        return IOEngineSession(self, local_mem, remote_mem) if known else None

    def pop_inbound_transfer_status(self, remote_key: str,
                                    transfer_uid: int) -> TransferStatus | None:
        """Status of a transfer a peer ran against this engine, once it has finished."""
        return self._listener.pop(remote_key, transfer_uid)

    def _submit(self, local: MemoryDesc, local_offsets: Sequence[int], remote: MemoryDesc,
                remote_offsets: Sequence[int], sizes: Sequence[int], uid: int, *,
                write: bool, per_entry: bool = False) -> list[TransferStatus]:
        """Validate, then queue the copy on a worker thread; statuses are IN_PROGRESS."""
        statuses = [TransferStatus() for _ in (sizes if per_entry else [0])]
        with self._lock:
            peer = self._remotes.get(remote.engine_key)
            problem = self._problem(local, local_offsets, remote, remote_offsets, sizes, peer)
        if problem is not None or peer is None or self._pool is None:
            code, message = problem or (StatusCode.ERR_BAD_STATE, "no backend created")
            for status in statuses:
                status.Update(code, message)
            return statuses
        for status in statuses:
            status.SetCode(StatusCode.IN_PROGRESS)
        local_iov = [(local.data + o, n) for o, n in zip(local_offsets, sizes, strict=True)]
        remote_iov = [(remote.data + o, n) for o, n in zip(remote_offsets, sizes, strict=True)]
        self._pool.submit(self._run, peer, local_iov, remote_iov, write, statuses, uid)
        return statuses

    def _problem(self, local: MemoryDesc, local_offsets: Sequence[int], remote: MemoryDesc,
                 remote_offsets: Sequence[int], sizes: Sequence[int],
                 peer: EngineDesc | None) -> tuple[StatusCode, str] | None:
        if local.id not in self._mems or local.engine_key != self._key:
            return StatusCode.ERR_NOT_FOUND, "local memory is not registered with this engine"
        if peer is None:
            return StatusCode.ERR_NOT_FOUND, f"remote engine {remote.engine_key!r} unknown"
        if not (len(local_offsets) == len(remote_offsets) == len(sizes)):
            return StatusCode.ERR_INVALID_ARGS, "offsets and sizes differ in length"
        if not (_in_bounds(local, local_offsets, sizes)
                and _in_bounds(remote, remote_offsets, sizes)):
            return StatusCode.ERR_INVALID_ARGS, "transfer out of the registered range"
        return None

    def _run(self, peer: EngineDesc, local_iov: list[tuple[int, int]],
             remote_iov: list[tuple[int, int]], write: bool,
             statuses: list[TransferStatus], uid: int) -> None:
        """Worker thread: the copy itself, then the statuses and the peer's notification."""
        try:
            _cross_copy(peer.pid, local_iov, remote_iov, write)
            code, message = StatusCode.SUCCESS, ""
        except OSError as exc:
            code, message = StatusCode.ERR_RDMA_OP, str(exc)
        for status in statuses:
            status.Update(code, message)
        if self._notify and code is StatusCode.SUCCESS:
            _NotifyListener.send(peer.host, peer.port, [self._key, uid, code.value, message])


class IOEngineSession:
    """A (local buffer, remote buffer) pair: transfers by offsets only."""

    def __init__(self, engine: IOEngine, local_mem: MemoryDesc, remote_mem: MemoryDesc) -> None:
        self._engine = engine
        self._local = local_mem
        self._remote = remote_mem

    def allocate_transfer_uid(self) -> int:
        """A fresh transfer id."""
        return self._engine.allocate_transfer_uid()

    def read(self, local_offset: int, remote_offset: int, size: int,
             transfer_uid: int) -> TransferStatus:
        """One-sided read."""
        return self._engine.read(self._local, local_offset, self._remote, remote_offset, size,
                                 transfer_uid)

    def write(self, local_offset: int, remote_offset: int, size: int,
              transfer_uid: int) -> TransferStatus:
        """One-sided write."""
        return self._engine.write(self._local, local_offset, self._remote, remote_offset, size,
                                  transfer_uid)

    def batch_read(self, local_offsets: Sequence[int], remote_offsets: Sequence[int],
                   sizes: Sequence[int], transfer_uid: int) -> TransferStatus:
        """Batched one-sided reads; one status for the whole batch."""
        return self._engine._submit(self._local, local_offsets, self._remote, remote_offsets,
                                    sizes, transfer_uid, write=False)[0]

    def batch_write(self, local_offsets: Sequence[int], remote_offsets: Sequence[int],
                    sizes: Sequence[int], transfer_uid: int) -> TransferStatus:
        """Batched one-sided writes; one status for the whole batch."""
        return self._engine._submit(self._local, local_offsets, self._remote, remote_offsets,
                                    sizes, transfer_uid, write=True)[0]

    def alive(self) -> bool:
        """Whether the remote engine's process still exists."""
        with self._engine._lock:
            peer = self._engine._remotes.get(self._remote.engine_key)
        if peer is None:
            return False
        try:
            os.kill(peer.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
