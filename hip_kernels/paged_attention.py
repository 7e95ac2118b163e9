"""Attention over the paged KV cache: decode (one query per sequence) and prefill/extend.

The kernels live in ``paged_decode_attention`` and ``paged_prefill_attention`` (each beside
its reference); this module is the one import point the engine uses for both.
"""

from __future__ import annotations

from hip_kernels.paged_decode_attention import (
    DecodePlan,
    decode_plan,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from hip_kernels.paged_prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
)

__all__ = ["DecodePlan", "decode_plan", "paged_decode_attention", "paged_decode_attention_ref",
           "paged_prefill_attention", "paged_prefill_attention_ref"]
