"""The GPU runtime beneath torch, for what torch does not expose: a raw async memcpy and
peer access between two devices (used by the ipc transport)."""

from __future__ import annotations

import ctypes
import os

import torch

from connectors.transports.base import TransportError

_MEMCPY_DEFAULT = 4
"""cudaMemcpyDefault == hipMemcpyDefault: direction inferred from unified addresses."""


class RuntimeMemcpy:
    """``cudaMemcpyAsync`` / ``hipMemcpyAsync`` of the GPU runtime torch has already loaded."""

    def __init__(self) -> None:
        path, symbol = _loaded_runtime()
        fn = getattr(ctypes.CDLL(path), symbol)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                       ctypes.c_void_p]
        fn.restype = ctypes.c_int
        self._fn = fn
        self.library = path

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Queue one copy on ``stream`` (the current device must be the stream's)."""
        rc = self._fn(dst, src, nbytes, _MEMCPY_DEFAULT, stream)
        if rc != 0:
            raise RuntimeError(f"{self.library}: memcpy of {nbytes} B failed with error {rc}")


def _loaded_runtime() -> tuple[str, str]:
    """Path and memcpy symbol of the CUDA or HIP runtime mapped into this process."""
    torch.cuda.init()
    with open("/proc/self/maps", encoding="utf-8") as maps:
        paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so")
                 or ".so." in line}
    for path in sorted(paths):
        name = os.path.basename(path)
        if name.startswith("libcudart.so"):
            return path, "cudaMemcpyAsync"
        if name.startswith("libamdhip64.so"):
            return path, "hipMemcpyAsync"
    raise TransportError("no CUDA/HIP runtime library (libcudart / libamdhip64) is loaded")


def enable_peer_access(a: torch.device, b: torch.device) -> None:
    """Let kernels on either GPU load/store the other's memory (IPC mappings included).

    torch enables peer access lazily, per direction, on its first cross-device ``copy_``; one
    byte each way between scratch tensors does it without touching either KV region.
    """
    if a == b:
        return
    x, y = torch.zeros(1, dtype=torch.uint8, device=a), torch.zeros(1, dtype=torch.uint8, device=b)
    y.copy_(x)
    x.copy_(y)
    torch.cuda.synchronize(a)
    torch.cuda.synchronize(b)
