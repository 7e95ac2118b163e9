"""The comparison and interpreter-subprocess helpers the kernel tests rely on."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import Case, CaseResult, combine, compare, interpreter_results

from hip_kernels.paged_kv import make_paged_kv


def test_case_ids_are_readable():
    assert Case("k", "bf16", {"shape": (3, 7, 129)}).id == "k-bf16-shape3x7x129"
    assert Case("k", "fp32", {"seqs": ((0, 5), (7, 3))}).id == "k-fp32-seqs0+5x7+3"


def test_compare_uses_the_dtype_tolerance():
    ref = torch.ones(4)
    assert compare("c", ref + 1e-6, ref, torch.float32).ok
    bad = compare("c", ref + 1e-3, ref, torch.float32)
    assert not bad.ok and "4/4 outside" in bad.detail
    assert compare("c", ref + 1e-3, ref, torch.bfloat16).ok


def test_compare_exact_and_shape_mismatch():
    ref = torch.arange(6.0)
    assert compare("c", ref.clone(), ref, torch.float32, exact=True).ok
    assert not compare("c", ref + 1e-7, ref, torch.float32, exact=True).ok
    assert not compare("c", ref[:3], ref, torch.float32).ok


def test_combine_fails_if_any_output_fails():
    good, bad = CaseResult("c", True, 0.0), CaseResult("c", False, 2.0, "off")
    assert combine([good, good]).ok
    merged = combine([good, bad])
    assert not merged.ok and merged.max_abs_err == 2.0 and merged.detail == "off"


def test_paged_kv_places_each_sequence_in_its_own_blocks():
    kv = make_paged_kv([5, 9], num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float32)
    used = [kv.block_tables[0, :2].tolist(), kv.block_tables[1, :3].tolist()]
    assert len(set(used[0] + used[1])) == 5
    assert kv.kv_layer.stride(0) == kv.kv_cache.stride(0)


def test_a_crashing_child_is_reported(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("raise SystemExit(3)\n")
    with pytest.raises(RuntimeError, match="rc=3"):
        interpreter_results(script, timeout_s=60)
