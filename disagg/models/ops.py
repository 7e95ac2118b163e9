"""The one place that picks kernel implementations: Triton on GPU, torch references on CPU."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from disagg.common import envs
from disagg.common.platform import is_gpu, triton_available

_KERNELS = {
    "reshape_and_cache": "hip_kernels.reshape_and_cache",
    "paged_decode_attention": "hip_kernels.paged_attention",
    "paged_prefill_attention": "hip_kernels.paged_attention",
    "rms_norm": "hip_kernels.rms_norm",
    "fused_add_rms_norm": "hip_kernels.rms_norm",
    "rotary_embedding": "hip_kernels.rotary_embedding",
    "rope_and_cache": "hip_kernels.rope_and_cache",
    "silu_and_mul": "hip_kernels.silu_and_mul",
    "gather_kv_blocks": "hip_kernels.kv_blocks",
    "scatter_kv_blocks": "hip_kernels.kv_blocks",
    "fused_moe": "hip_kernels.fused_moe",
    "paged_mla_decode": "hip_kernels.paged_mla_decode",
    "mla_prefill_attention": "hip_kernels.mla_prefill_attention",
    "fp8_gemm": "hip_kernels.fp8_gemm",
    "skinny_gemm": "hip_kernels.skinny_gemm",
    "greedy_argmax": "hip_kernels.greedy_argmax",
}


@dataclass(frozen=True, slots=True)
class Ops:
    """A resolved kernel set; ``backend`` says which one was chosen."""

    backend: str
    reshape_and_cache: Callable[..., Any]
    paged_decode_attention: Callable[..., Any]
    paged_prefill_attention: Callable[..., Any]
    rms_norm: Callable[..., Any]
    fused_add_rms_norm: Callable[..., Any]
    rotary_embedding: Callable[..., Any]
    rope_and_cache: Callable[..., Any]
    silu_and_mul: Callable[..., Any]
    gather_kv_blocks: Callable[..., Any]
    scatter_kv_blocks: Callable[..., Any]
    fused_moe: Callable[..., Any]
    paged_mla_decode: Callable[..., Any]
    mla_prefill_attention: Callable[..., Any]
    fp8_gemm: Callable[..., Any]
    skinny_gemm: Callable[..., Any]
    greedy_argmax: Callable[..., Any]
    skinny_rows: int = 0
    """Rows up to which a plain linear runs ``skinny_gemm`` (the arch's config; 0 on CPU)."""
    lt_rows: tuple[tuple[int, int], ...] = ()
    """Token counts whose forward prefers cuBLASLt / hipBLASLt (the arch's config; none on
    CPU): hip_kernels/vendor_blas.py."""

    def vendor_blas(self, rows: int) -> contextlib.AbstractContextManager[None]:
        """The vendor BLAS choice for a forward of ``rows`` tokens, as a context."""
        if not self.lt_rows:
            return contextlib.nullcontext()
        from hip_kernels.vendor_blas import prefer_lt

        return prefer_lt(rows, self.lt_rows)


def select_ops(device_type: str) -> Ops:
    """Triton launchers when running on a GPU with triton, else the ``*_ref`` functions."""
    use_triton = (device_type == "cuda" and is_gpu() and triton_available()
                  and not envs.force_torch_kernels())
    fns: dict[str, Callable[..., Any]] = {}
    for name, module_name in _KERNELS.items():
        module = importlib.import_module(module_name)
        fn = getattr(module, name, None) if use_triton else None
        fns[name] = fn if fn is not None else getattr(module, f"{name}_ref")
    rows = 0
    lt: tuple[tuple[int, int], ...] = ()
    if use_triton:
        from hip_kernels.skinny_gemm import max_rows
        from hip_kernels.vendor_blas import lt_rows

        rows, lt = max_rows(), lt_rows()
    return Ops(backend="triton" if use_triton else "torch", skinny_rows=rows, lt_rows=lt,
               **fns)
