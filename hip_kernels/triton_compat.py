"""Import triton when it is there, so that the ``*_ref`` functions import without it.

The engine imports every kernel module on CPU too (it falls back to the references there), and
triton is an optional dependency. Kernel modules use ``jit`` from here instead of
``triton.jit``: without triton it returns the function undecorated (never launched).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - the CPU test machine has triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit`` when triton imports, else the plain function (so the module imports)."""
    return triton.jit(fn) if HAS_TRITON else fn


def require_triton(kernel: str) -> None:
    """Raise a clear error when a Triton launcher is called without triton installed."""
    if not HAS_TRITON:
        raise RuntimeError(f"{kernel}: triton is not installed; use {kernel}_ref on this machine "
                           "or install the 'triton' extra")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1); Triton block shapes must be powers of two."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def interpreter_upcasts_dot(dtype: Any) -> bool:
    """Whether ``tl.dot`` inputs of ``dtype`` must be upcast to fp32 before the dot.

    Triton 3.9's interpreter (``TRITON_INTERPRET=1``) stores bf16 as uint16 and its ``tl.dot``
    multiplies those raw bits as integers. Only the interpreter needs this; compiled kernels
    keep the bf16 dot (MFMA / tensor cores).
    """
    import torch

    from disagg.common import envs

    return dtype == torch.bfloat16 and envs.triton_interpret()
