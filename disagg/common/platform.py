"""The one place that asks which platform this is: ROCm, CUDA or CPU.

torch's ``torch.cuda`` API is HIP on ROCm builds, so "cuda" below means any torch GPU.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class PlatformKind(enum.Enum):
    """Which accelerator stack torch was built for and can use now."""

    ROCM = "rocm"
    CUDA = "cuda"
    CPU = "cpu"


@dataclass(frozen=True, slots=True)
class PlatformInfo:
    """Facts about the accelerator, read once."""

    kind: PlatformKind
    device_count: int
    arch: str | None
    """gfx arch on ROCm (``gfx942``), ``sm_90`` style on CUDA, None on CPU."""
    warp_size: int
    """64 on CDNA (MI300X wavefront), 32 on NVIDIA."""
    device_name: str | None
    torch_version: str
    hip_version: str | None
    cuda_version: str | None


@functools.cache
def current_platform() -> PlatformInfo:
    """Detect the platform once per process."""
    import torch  # here, not at import: an instance's frontend never needs torch (start-up)

    hip = getattr(torch.version, "hip", None)
    cuda = torch.version.cuda
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if not available or count == 0:
        return PlatformInfo(PlatformKind.CPU, 0, None, 1, None, torch.__version__, hip, cuda)
    props = torch.cuda.get_device_properties(0)
    if hip:
        arch = str(getattr(props, "gcnArchName", "gfx")).split(":")[0]
        return PlatformInfo(PlatformKind.ROCM, count, arch, 64, props.name, torch.__version__,
                            hip, None)
    arch = f"sm_{props.major}{props.minor}"
    return PlatformInfo(PlatformKind.CUDA, count, arch, 32, props.name, torch.__version__,
                        None, cuda)


def is_gpu() -> bool:
    """True on ROCm or CUDA with at least one visible device."""
    return current_platform().kind is not PlatformKind.CPU


def default_device() -> str:
    """``cuda`` when a torch GPU is visible (ROCm included), else ``cpu``."""
    return "cuda" if is_gpu() else "cpu"


def triton_available() -> bool:
    """Whether the triton package imports (it need not have a GPU to compile)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def visible_devices_env() -> str:
    """The variable that selects GPUs for a child process on this platform."""
    return "HIP_VISIBLE_DEVICES" if current_platform().kind is PlatformKind.ROCM \
        else "CUDA_VISIBLE_DEVICES"


def fp8_dtype() -> torch.dtype:
    """The e4m3 fp8 dtype this platform's hardware computes in: ``float8_e4m3fnuz`` on
    MI300-class ROCm GPUs (gfx94x), the OCP ``float8_e4m3fn`` everywhere else (gfx950, NVIDIA,
    CPU)."""
    arch = current_platform().arch or ""
    import torch

    return torch.float8_e4m3fnuz if arch.startswith("gfx94") else torch.float8_e4m3fn
