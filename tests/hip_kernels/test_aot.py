"""Every kernel compiles ahead of time for gfx942, gfx950 and sm_90; none spills on gfx942."""

from __future__ import annotations

import pytest

from hip_kernels.aot import (
    TARGETS,
    CompileReport,
    all_specs,
    compile_spec,
    main,
    parse_amdgcn_stats,
    parse_ptxas_stats,
    parse_target,
)
from hip_kernels.launch_config import arch_for_target

SPILL_FREE_TARGETS = ("hip:gfx942",)
KERNEL_NAMES = ("reshape_and_cache", "paged_decode_attention", "paged_decode_reduce",
                "paged_prefill_attention", "paged_mla_decode", "paged_mla_decode_reduce",
                "rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul",
                "gather_kv_blocks", "scatter_kv_blocks", "copy_segments", "moe_align",
                "fused_moe_gate_up", "fused_moe_down", "fused_moe_combine", "fp8_gemm",
                "mla_prefill_attention", "skinny_gemm", "greedy_argmax",
                "rope_and_cache")

AMDGCN_SAMPLE = """
; TotalNumSgprs: 106
; NumVgprs: 237
; ScratchSize: 0
; Occupancy: 2
    .sgpr_spill_count: 55
    .vgpr_spill_count: 0
"""
PTXAS_SAMPLE = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 22528 bytes smem"""

SPECS = [(target, spec) for target in TARGETS for spec in all_specs(arch_for_target(target))]


def test_amdgcn_stats_are_parsed():
    stats = parse_amdgcn_stats(AMDGCN_SAMPLE)
    assert stats == {"num_vgprs": 237, "num_sgprs": 106, "scratch_bytes": 0, "occupancy": 2,
                     "vgpr_spill_count": 0, "sgpr_spill_count": 55}


def test_ptxas_stats_are_parsed():
    assert parse_ptxas_stats(PTXAS_SAMPLE) == {"num_regs": 255, "spill_bytes": 8}


def test_sgpr_spills_alone_are_not_memory_spills():
    assert not CompileReport("k", "hip:gfx942", 0, scratch_bytes=0, vgpr_spill_count=0,
                             sgpr_spill_count=9).spills
    assert CompileReport("k", "hip:gfx942", 0, scratch_bytes=16, vgpr_spill_count=0).spills
    assert CompileReport("k", "cuda:90", 0, num_regs=255, spill_bytes=8).spills


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown target"):
        parse_target("rocm:mi300")


def test_every_kernel_has_aot_specs_for_every_target():
    for target in TARGETS:
        names = {spec.name.split("[")[0] for spec in all_specs(arch_for_target(target))}
        assert names == set(KERNEL_NAMES), target


@pytest.mark.parametrize(("target", "spec"), SPECS, ids=[f"{t}-{s.name}" for t, s in SPECS])
def test_kernel_compiles_for_target(target, spec):
    report = compile_spec(spec, target)
    if target.startswith("hip"):
        assert report.num_vgprs is not None and report.num_vgprs > 0
        assert report.scratch_bytes is not None
    if target in SPILL_FREE_TARGETS:
        assert not report.spills, (f"{spec.name} on {target}: scratch={report.scratch_bytes} "
                                   f"vgpr_spills={report.vgpr_spill_count}")


def test_cli_reports_every_kernel_for_one_target(capsys):
    assert main(["--target", "hip:gfx942"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(all_specs("gfx942"))
    assert all(line.startswith("hip:gfx942") and "vgprs=" in line for line in lines)
