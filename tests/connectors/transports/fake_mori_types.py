"""Types of the fake MoRI-IO API (see ``fake_mori``): enums, configs, status, descs."""

from __future__ import annotations

import enum
import threading

import msgspec


class BackendType(enum.Enum):
    """Transport backends of the real engine (the fake treats them all alike)."""

    Unknown = 0
    XGMI = 1
    RDMA = 2
    TCP = 3


class MemoryLocationType(enum.Enum):
    """Where registered memory lives."""

    Unknown = 0
    CPU = 1
    GPU = 2


class StatusCode(enum.Enum):
    """Transfer status codes (same names as mori.io.StatusCode)."""

    SUCCESS = 0
    INIT = 1
    IN_PROGRESS = 2
    ERR_INVALID_ARGS = 3
    ERR_NOT_FOUND = 4
    ERR_RDMA_OP = 5
    ERR_BAD_STATE = 6
    ERR_GPU_OP = 7


class PollCqMode(enum.Enum):
    """Completion-queue polling mode of the RDMA backend."""

    POLLING = 0
    EVENT = 1


class RdmaBackendConfig:
    """RDMA backend settings (only ``num_worker_threads`` and notifications matter here)."""

    def __init__(self, qp_per_transfer: int = 1, post_batch_size: int = -1,
                 num_worker_threads: int = -1, poll_cq_mode: PollCqMode = PollCqMode.POLLING,
                 enable_notification: bool = True, notif_per_qp: int = 1024) -> None:
        self.qp_per_transfer = qp_per_transfer
        self.post_batch_size = post_batch_size
        self.num_worker_threads = num_worker_threads
        self.poll_cq_mode = poll_cq_mode
        self.enable_notification = enable_notification
        self.notif_per_qp = notif_per_qp


class XgmiBackendConfig:
    """XGMI backend settings."""

    def __init__(self, num_streams: int = 64, num_events: int = 64) -> None:
        self.num_streams = num_streams
        self.num_events = num_events


class TcpBackendConfig:
    """TCP backend settings (none needed by the fake)."""


class IOEngineConfig:
    """Engine address for its control channel."""

    def __init__(self, host: str = "", port: int = 0) -> None:
        self.host = host
        self.port = port


class TransferStatus:
    """Completion state of one call, updated by the engine's worker threads."""

    def __init__(self) -> None:
        self._code = StatusCode.INIT
        self._message = ""
        self._done = threading.Event()

    def Code(self) -> StatusCode:  # the real API uses CamelCase methods
        """Current status code."""
        return self._code

    def Message(self) -> str:
        """Error text (empty on success)."""
        return self._message

    def Init(self) -> bool:
        """Not started."""
        return self._code is StatusCode.INIT

    def InProgress(self) -> bool:
        """Posted, not finished."""
        return self._code is StatusCode.IN_PROGRESS

    def Succeeded(self) -> bool:
        """Finished without error."""
        return self._code is StatusCode.SUCCESS

    def Failed(self) -> bool:
        """Finished with an error code."""
        return self._code not in (StatusCode.SUCCESS, StatusCode.INIT, StatusCode.IN_PROGRESS)

    def SetCode(self, code: StatusCode) -> None:
        """Set the code; a terminal code wakes waiters."""
        self._code = code
        if code not in (StatusCode.INIT, StatusCode.IN_PROGRESS):
            self._done.set()

    def SetMessage(self, message: str) -> None:
        """Set the error text."""
        self._message = message

    def Update(self, code: StatusCode, message: str) -> None:
        """Set message then code."""
        self.SetMessage(message)
        self.SetCode(code)

    def Wait(self) -> None:
        """Block until finished (the fake bounds it at 10 min to never hang a test)."""
        self._done.wait(600.0)

    def WaitFor(self, timeout_ms: int = -1) -> bool:
        """Block up to ``timeout_ms`` (-1: as Wait); True if finished."""
        return self._done.wait(600.0 if timeout_ms < 0 else timeout_ms / 1000.0)


class _EngineDescWire(msgspec.Struct, array_like=True):
    key: str
    node_id: str
    hostname: str
    host: str
    port: int
    pid: int


class _MemoryDescWire(msgspec.Struct, array_like=True):
    engine_key: str
    id: int
    device_id: int
    device_bus_id: str
    data: int
    size: int
    loc: int
    ipc_handle: bytes


class EngineDesc:
    """Identity and address of an engine (read-only fields, msgpack pack/unpack)."""

    def __init__(self, wire: _EngineDescWire) -> None:
        self._wire = wire
        self.key, self.node_id, self.hostname = wire.key, wire.node_id, wire.hostname
        self.host, self.port, self.pid = wire.host, wire.port, wire.pid

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EngineDesc) and self._wire == other._wire

    def __hash__(self) -> int:
        return hash(self.key)

    def pack(self) -> bytes:
        """msgpack bytes."""
        return msgspec.msgpack.encode(self._wire)

    @staticmethod
    def unpack(raw: bytes) -> EngineDesc:
        """Inverse of ``pack``."""
        return EngineDesc(msgspec.msgpack.decode(raw, type=_EngineDescWire))


class MemoryDesc:
    """A registered memory region of some engine (read-only fields, pack/unpack)."""

    def __init__(self, wire: _MemoryDescWire | None = None) -> None:
        self._wire = wire or _MemoryDescWire("", 0, -1, "", 0, 0, 0, b"")
        w = self._wire
        self.engine_key, self.id, self.device_id = w.engine_key, w.id, w.device_id
        self.device_bus_id, self.data, self.size = w.device_bus_id, w.data, w.size
        self.loc, self.ipc_handle = MemoryLocationType(w.loc), w.ipc_handle

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemoryDesc) and self._wire == other._wire

    def __hash__(self) -> int:
        return hash((self.engine_key, self.id))

    def pack(self) -> bytes:
        """msgpack bytes."""
        return msgspec.msgpack.encode(self._wire)

    @staticmethod
    def unpack(raw: bytes) -> MemoryDesc:
        """Inverse of ``pack``."""
        return MemoryDesc(msgspec.msgpack.decode(raw, type=_MemoryDescWire))


def set_log_level(level: str) -> None:
    """Accepted for API parity; the fake does not log."""
