"""The engine's import point for attention names both launchers and both references."""

from __future__ import annotations

from kernel_testing import same_signature

from hip_kernels import paged_attention, paged_decode_attention, paged_prefill_attention


def test_facade_exports_the_kernel_modules_functions():
    assert paged_attention.paged_decode_attention is paged_decode_attention.paged_decode_attention
    assert (paged_attention.paged_prefill_attention_ref
            is paged_prefill_attention.paged_prefill_attention_ref)


def test_every_launcher_matches_its_reference_signature():
    for name in ("paged_decode_attention", "paged_prefill_attention"):
        assert same_signature(getattr(paged_attention, name),
                              getattr(paged_attention, f"{name}_ref")), name
