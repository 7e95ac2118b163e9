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
    """``cudaMemcpyAsync`` / ``hipMemcpyAsync`` of the GPU runtime torch has already loaded,
    and its 2D form (``cudaMemcpy2DAsync`` / ``hipMemcpy2DAsync``, same argument order)."""

    def __init__(self) -> None:
        path, prefix = _loaded_runtime()
        lib = ctypes.CDLL(path)
        fn = getattr(lib, f"{prefix}MemcpyAsync")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                       ctypes.c_void_p]
        fn.restype = ctypes.c_int
        self._fn = fn
        # dst, dpitch, src, spitch, width, height, kind, stream
        fn2d = getattr(lib, f"{prefix}Memcpy2DAsync")
        size = ctypes.c_size_t
        fn2d.argtypes = [ctypes.c_void_p, size, ctypes.c_void_p, size, size, size, ctypes.c_int,
                         ctypes.c_void_p]
        fn2d.restype = ctypes.c_int
        self._fn2d = fn2d
        self.library = path

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Queue one copy on ``stream`` (the current device must be the stream's)."""
        rc = self._fn(dst, src, nbytes, _MEMCPY_DEFAULT, stream)
        if rc != 0:
            raise RuntimeError(f"{self.library}: memcpy of {nbytes} B failed with error {rc}")

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int,
                height: int, stream: int) -> None:
        """Queue ``height`` copies of ``width`` bytes, row i from ``src + i * src_pitch`` to
        ``dst + i * dst_pitch``, as one call on ``stream`` (the current device's)."""
        rc = self._fn2d(dst, dst_pitch, src, src_pitch, width, height, _MEMCPY_DEFAULT, stream)
        if rc != 0:
            raise RuntimeError(f"{self.library}: 2D memcpy of {height} x {width} B failed "
                               f"with error {rc}")


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


class BatchRows:
    """One batch of copies laid out for ``cuMemcpyBatchAsync``: one [3, n] uint64 array of
    destination addresses, source addresses and sizes, plus the shared attributes. Issuing a
    slice of it costs pointer arithmetic only."""

    def __init__(self, dst_offsets: np.ndarray, src_offsets: np.ndarray, sizes: np.ndarray, *,
                 dst_base: int, src_base: int, src_device: int, dst_device: int) -> None:
        count = len(sizes)
        table = np.empty((3, count), dtype=np.uint64)
        table[0], table[1], table[2] = dst_offsets, src_offsets, sizes
        table[0] += np.uint64(dst_base)  # in uint64: int64 + uint64 would promote to float
        table[1] += np.uint64(src_base)
        self.table = table
        base = table.ctypes.data
        self.bases = (base, base + 8 * count, base + 16 * count)
        self.attrs = _attributes(src_device, dst_device)
        self.count = count

    def __len__(self) -> int:
        return self.count


_ATTRIBUTES: dict[tuple[int, int], tuple[_MemcpyAttributes, int]] = {}


def _attributes(src_device: int, dst_device: int) -> int:
    """Address of the (kept alive) CUmemcpyAttributes for copies between two devices."""
    key = (src_device, dst_device)
    if key not in _ATTRIBUTES:
        attrs = _MemcpyAttributes(_SRC_ACCESS_ORDER_STREAM,
                                  _MemLocation(_LOCATION_DEVICE, src_device),
                                  _MemLocation(_LOCATION_DEVICE, dst_device), 0)
        _ATTRIBUTES[key] = (attrs, ctypes.addressof(attrs))
    return _ATTRIBUTES[key][1]


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
        # Arrays go as plain addresses (c_void_p from int): a slice of a batch is base + 8 * i.
        # Argument order: dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs[, failIdx], stream
        ptr = ctypes.c_void_p
        fn.argtypes = [ptr, ptr, ptr, ctypes.c_size_t, ptr, ptr, ctypes.c_size_t,
                       *([ptr] if self._has_fail_idx else []), ptr]
        fn.restype = ctypes.c_int
        self._fn = fn
        self._attrs_idx = (ctypes.c_size_t * 1)(0)  # every copy uses attribute set 0
        self._fail_idx = (ctypes.c_size_t * 1)(0)
        self._tail = ((ctypes.addressof(self._attrs_idx), 1)
                      + ((ctypes.addressof(self._fail_idx),) if self._has_fail_idx else ()))

    def copy(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: int, *,
             src_device: int, dst_device: int) -> None:
        """Queue ``dsts[i] <- srcs[i]`` (``sizes[i]`` bytes; uint64 arrays of addresses) for
        every i on ``stream`` (the current device's)."""
        rows = BatchRows(dsts, srcs, sizes, dst_base=0, src_base=0, src_device=src_device,
                         dst_device=dst_device)
        self.copy_rows(rows, 0, len(rows), stream)

    def copy_rows(self, rows: BatchRows, start: int, stop: int, stream: int) -> None:
        """Queue copies ``start:stop`` of ``rows`` on ``stream`` (the current device's)."""
        count = stop - start
        if count <= 0:
            return
        dsts, srcs, sizes = (base + 8 * start for base in rows.bases)
        rc = self._fn(dsts, srcs, sizes, count, rows.attrs, *self._tail, stream)
        if rc != 0:
            raise RuntimeError(f"cuMemcpyBatchAsync of {count} copies failed with error {rc}")


def _loaded_runtime() -> tuple[str, str]:
    """Path and symbol prefix (``cuda`` / ``hip``) of the runtime mapped into this process."""
    torch.cuda.init()
    with open("/proc/self/maps", encoding="utf-8") as maps:
        paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so")
                 or ".so." in line}
    for path in sorted(paths):
        name = os.path.basename(path)
        if name.startswith("libcudart.so"):
            return path, "cuda"
        if name.startswith("libamdhip64.so"):
            return path, "hip"
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
