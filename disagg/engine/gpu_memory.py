"""Where an instance's GPU memory goes, and how much of it this process holds.

The budget is ``--gpu-memory-utilization x total``. Everything the process will hold comes out
of it before the KV cache gets the rest:

    weights       what the model's parameters hold (torch allocator, after loading)
    activations   the profiled peak above the weights: one forward of max_num_batched_tokens
                  plus the sampler over max_num_seqs rows (sort, top-k, logprobs), as the
                  caching allocator reserved it (its cached segments stay with the process)
    graphs        the decode graphs' private pool: every graph captured once over a one-block
                  cache before the cache is sized, then released and captured for real
    other         memory outside torch's allocator: the CUDA/HIP context, lazily loaded
                  kernels, cuBLAS/hipBLASLt handles, NCCL/RCCL buffers

"other" is read per process where the driver says so (NVML on NVIDIA, the KFD's sysfs on AMD,
the numbers nvidia-smi and rocm-smi print); where it does not (a container hiding the pid), the
device-wide used memory minus torch's is taken, which counts other processes on the same GPU
too: the cache gets smaller, never too large.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from disagg.common.memory_split import describe_memory

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MemorySplit:
    """One instance's GPU memory budget and what each part of it holds (bytes)."""

    total: int
    utilization: float
    weights: int
    activations: int
    graphs: int
    other: int
    kv: int = 0

    @property
    def budget(self) -> int:
        return int(self.total * self.utilization)

    @property
    def before_kv(self) -> int:
        """What the process holds before its KV cache."""
        return self.weights + self.activations + self.graphs + self.other

    @property
    def kv_room(self) -> int:
        """Bytes the KV cache may take (may be <= 0: nothing fits)."""
        return self.budget - self.before_kv

    def parts(self) -> dict[str, int]:
        """Bytes by part, as the ready handshake carries them (disagg/common/memory_split.py)."""
        return {"total": self.total, "budget": self.budget, "weights": self.weights,
                "kv": self.kv, "graphs": self.graphs, "activations": self.activations,
                "other": self.other}

    def describe(self) -> str:
        """The split as one line, in GiB."""
        return describe_memory(self.parts())


class _NvmlProcess(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


NVML_MAX_PROCESSES = 256


def nvml_process_bytes(pci_bus_id: str, pid: int, lib: object | None = None) -> int | None:
    """This pid's memory on the GPU at ``pci_bus_id`` (NVML, as nvidia-smi shows it); None when
    NVML is missing, fails, or does not list the pid (a container's own pid namespace)."""
    try:
        nv = lib if lib is not None else ctypes.CDLL("libnvidia-ml.so.1")
        if nv.nvmlInit_v2() != 0:  # type: ignore[attr-defined]
            return None
        handle = ctypes.c_void_p()
        if nv.nvmlDeviceGetHandleByPciBusId_v2(  # type: ignore[attr-defined]
                pci_bus_id.encode(), ctypes.byref(handle)) != 0:
            return None
        count = ctypes.c_uint(NVML_MAX_PROCESSES)
        procs = (_NvmlProcess * NVML_MAX_PROCESSES)()
        if nv.nvmlDeviceGetComputeRunningProcesses_v3(  # type: ignore[attr-defined]
                handle, ctypes.byref(count), procs) != 0:
            return None
    except (OSError, AttributeError):
        return None
    for i in range(min(count.value, NVML_MAX_PROCESSES)):
        if procs[i].pid == pid:
            return int(procs[i].usedGpuMemory)
    return None


def kfd_process_bytes(pid: int, root: Path = Path("/sys/class/kfd/kfd/proc")) -> int | None:
    """This pid's VRAM on AMD GPUs (the KFD's per-process sysfs files, what rocm-smi reads),
    summed over the GPUs it uses (an engine process uses one); None when absent."""
    folder = root / str(pid)
    try:
        files = [f for f in folder.iterdir() if f.name.startswith("vram_")]
        return sum(int(f.read_text().strip() or 0) for f in files) if files else None
    except (OSError, ValueError):
        return None


def process_gpu_bytes(device_index: int) -> int | None:
    """GPU memory this process holds on ``device_index`` as the driver counts it, or None."""
    import torch

    if torch.version.hip:
        return kfd_process_bytes(os.getpid())
    props = torch.cuda.get_device_properties(device_index)
    address = [getattr(props, f"pci_{part}_id", None) for part in ("domain", "bus", "device")]
    if None in address:  # a torch build without the PCI address
        return None
    bus = f"{address[0]:08x}:{address[1]:02x}:{address[2]:02x}.0"
    return nvml_process_bytes(bus, os.getpid())


def outside_torch_bytes(device_index: int) -> tuple[int, str]:
    """(bytes this process holds outside torch's caching allocator, how it was measured)."""
    import torch

    reserved = torch.cuda.memory_reserved(device_index)
    held = process_gpu_bytes(device_index)
    if held is not None:
        return max(0, held - reserved), "per process"
    free, total = torch.cuda.mem_get_info(device_index)
    return max(0, total - free - reserved), "device-wide (per-process count unavailable)"
