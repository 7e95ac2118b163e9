"""The GPU runtime beneath torch, for what torch does not expose: a raw async memcpy and
peer access between two devices (used by the ipc transport)."""

from __future__ import annotations

import ctypes
import os

import numpy as np
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


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    """CUmemcpyAttributes: source access order, location hints, flags."""

    _fields_ = [("src_access_order", ctypes.c_int), ("src_loc_hint", _MemLocation),
                ("dst_loc_hint", _MemLocation), ("flags", ctypes.c_uint)]


_SRC_ACCESS_ORDER_STREAM = 1
"""CU_MEMCPY_SRC_ACCESS_ORDER_STREAM: sources are read in stream order (like cuMemcpyAsync)."""
_LOCATION_DEVICE = 1
"""CU_MEM_LOCATION_TYPE_DEVICE."""


class BatchMemcpy:
    """``cuMemcpyBatchAsync`` (CUDA >= 12.8 driver): many device copies in one call.

    The driver API is used because its ABI is versioned by symbol (``_v2`` drops the
    ``failIdx`` out-parameter of the 12.8 form); the runtime's wrapper changed signature in
    place between 12.8 and 13. Not available on ROCm (raises TransportError).
    """

    def __init__(self) -> None:
        torch.cuda.init()
        if torch.version.hip is not None:
            raise TransportError("batched memcpy: no HIP equivalent of cuMemcpyBatchAsync")
        lib = ctypes.CDLL("libcuda.so.1")
        self._has_fail_idx = not hasattr(lib, "cuMemcpyBatchAsync_v2")
        fn = getattr(lib, "cuMemcpyBatchAsync" if self._has_fail_idx else "cuMemcpyBatchAsync_v2",
                     None)
        if fn is None:
            raise TransportError("batched memcpy: the CUDA driver lacks cuMemcpyBatchAsync "
                                 "(needs a 12.8+ driver)")
        ptrs = ctypes.POINTER(ctypes.c_uint64)
        sizes = ctypes.POINTER(ctypes.c_size_t)
        args = [ptrs, ptrs, ptrs, ctypes.c_size_t, ctypes.POINTER(_MemcpyAttributes), sizes,
                ctypes.c_size_t]
        fn.argtypes = args + ([sizes] if self._has_fail_idx else []) + [ctypes.c_void_p]
        fn.restype = ctypes.c_int
        self._fn = fn

    def copy(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: int, *,
             src_device: int, dst_device: int) -> None:
        """Queue ``dsts[i] <- srcs[i]`` (``sizes[i]`` bytes; uint64 arrays of addresses) for
        every i on ``stream`` (the current device's)."""
        count = len(sizes)
        if count == 0:
            return
        attrs = _MemcpyAttributes(_SRC_ACCESS_ORDER_STREAM, _MemLocation(_LOCATION_DEVICE,
                                  src_device), _MemLocation(_LOCATION_DEVICE, dst_device), 0)
        arrays = [np.ascontiguousarray(a, dtype=np.uint64) for a in (dsts, srcs, sizes)]
        ptrs = [a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64)) for a in arrays]
        args: list[object] = [*ptrs, count, ctypes.byref(attrs), (ctypes.c_size_t * 1)(0), 1]
        if self._has_fail_idx:
            args.append((ctypes.c_size_t * 1)(0))
        rc = self._fn(*args, stream)
        if rc != 0:
            raise RuntimeError(f"cuMemcpyBatchAsync of {count} copies failed with error {rc}")


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
