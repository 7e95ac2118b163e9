"""Compile every kernel ahead of time for a GPU target, without a GPU, and read its register use.

Triton compiles for any ``GPUTarget`` on a CPU-only machine: the AMD backend links the code
object in-process (no ld.lld needed) and the NVIDIA backend runs the ``ptxas`` its wheel ships.
On AMD the assembly carries ``; NumVgprs:``, ``; ScratchSize:``, ``; Occupancy:`` and
``.vgpr_spill_count:``; on NVIDIA we rerun ``ptxas -v`` on the PTX for registers and spills.

    python -m hip_kernels.aot [--target hip:gfx942 ...]   # prints one row per kernel

``python -m bench.aot_rows`` runs the same compilations and keeps them as result rows.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hip_kernels.launch_config import KernelSpec, arch_for_target

TARGETS = ("hip:gfx942", "hip:gfx950", "cuda:90")
PTXAS_TIMEOUT_S = 60.0

_AMDGCN_FIELDS = {
    "num_vgprs": r";\s*NumVgprs:\s*(\d+)",
    "num_sgprs": r";\s*TotalNumSgprs:\s*(\d+)",
    "scratch_bytes": r";\s*ScratchSize:\s*(\d+)",
    "occupancy": r";\s*Occupancy:\s*(\d+)",
    "vgpr_spill_count": r"\.vgpr_spill_count:\s*(\d+)",
    "sgpr_spill_count": r"\.sgpr_spill_count:\s*(\d+)",
}


@dataclass(frozen=True, slots=True)
class CompileReport:
    """What one compilation used; AMD fields are None on NVIDIA targets and vice versa."""

    kernel: str
    target: str
    shared_bytes: int
    num_vgprs: int | None = None
    num_sgprs: int | None = None
    scratch_bytes: int | None = None
    occupancy: int | None = None
    """Waves per SIMD on AMD."""
    vgpr_spill_count: int | None = None
    sgpr_spill_count: int | None = None
    """SGPRs spilled into VGPR lanes (no memory traffic): reported, not a failure."""
    num_regs: int | None = None
    """Registers per thread on NVIDIA (ptxas -v)."""
    spill_bytes: int | None = None
    """Spill stores + spill loads on NVIDIA (ptxas -v)."""

    @property
    def spills(self) -> bool:
        """True if the kernel spills registers to memory or uses scratch memory."""
        counts = (self.scratch_bytes, self.vgpr_spill_count, self.spill_bytes)
        return any(c for c in counts if c is not None)


def parse_target(target: str) -> Any:
    """``hip:gfx942`` / ``cuda:90`` -> triton ``GPUTarget`` (wavefront 64 on AMD, 32 on NVIDIA)."""
    from triton.backends.compiler import GPUTarget

    backend, _, arch = target.partition(":")
    if backend == "hip" and arch.startswith("gfx"):
        return GPUTarget("hip", arch, 64)
    if backend == "cuda" and arch.isdigit():
        return GPUTarget("cuda", int(arch), 32)
    raise ValueError(f"unknown target {target!r}: expected hip:gfxNNN or cuda:NN")


def parse_amdgcn_stats(asm: str) -> dict[str, int]:
    """Register, scratch, occupancy and spill figures from AMDGCN assembly text."""
    stats = {}
    for name, pattern in _AMDGCN_FIELDS.items():
        match = re.search(pattern, asm)
        if match:
            stats[name] = int(match.group(1))
    return stats


def parse_ptxas_stats(log: str) -> dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` output."""
    stats = {}
    regs = re.search(r"Used (\d+) registers", log)
    if regs:
        stats["num_regs"] = int(regs.group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if spills:
        stats["spill_bytes"] = int(spills.group(1)) + int(spills.group(2))
    return stats


def _ptxas_stats(ptx: str, capability: int) -> dict[str, int]:
    """Rerun the wheel's ptxas with -v (Triton drops its log); {} if ptxas is unavailable."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        ptxas = get_ptxas(capability).path
        gpu_name = sm_arch_from_capability(capability)
    except Exception:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu_name}", str(src), "-o",
                               str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, timeout=PTXAS_TIMEOUT_S)
    return parse_ptxas_stats(proc.stderr + proc.stdout) if proc.returncode == 0 else {}


def compile_spec(spec: KernelSpec, target: str) -> CompileReport:
    """Compile one spec for ``target``; raises if Triton cannot compile it."""
    import triton
    from triton.compiler import ASTSource

    gpu_target = parse_target(target)
    params = list(spec.signature)
    aligned = [name for name, ty in spec.signature.items()
               if ty.startswith("*") or name in spec.aligned]
    attrs = {(params.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                    attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages,
               "enable_fp_fusion": True}
    compiled = triton.compile(src, target=gpu_target, options=options)
    shared_bytes = int(getattr(compiled.metadata, "shared", 0) or 0)
    if gpu_target.backend == "hip":
        stats = parse_amdgcn_stats(compiled.asm["amdgcn"])
    else:
        stats = _ptxas_stats(compiled.asm["ptx"], gpu_target.arch)
    return CompileReport(kernel=spec.name, target=target, shared_bytes=shared_bytes, **stats)


def all_specs(arch: str) -> list[KernelSpec]:
    """Every kernel's AOT specs for a config arch (``gfx942``, ``sm_90``, ``default``)."""
    from hip_kernels import (
        fp8_gemm,
        fused_moe,
        greedy_argmax,
        kv_blocks,
        mla_prefill_attention,
        paged_decode_attention,
        paged_mla_decode,
        paged_prefill_attention,
        reshape_and_cache,
        rms_norm,
        rope_and_cache,
        rotary_embedding,
        silu_and_mul,
        skinny_gemm,
    )

    modules = (reshape_and_cache, paged_decode_attention, paged_prefill_attention,
               paged_mla_decode, mla_prefill_attention, rms_norm, rotary_embedding,
               silu_and_mul, kv_blocks, fused_moe, fp8_gemm, skinny_gemm, greedy_argmax,
               rope_and_cache)
    return [spec for module in modules for spec in module.aot_specs(arch)]


def format_report(report: CompileReport) -> str:
    """One human-readable line."""
    if report.num_regs is not None or report.target.startswith("cuda"):
        figures = f"regs={report.num_regs} spill_bytes={report.spill_bytes}"
    else:
        figures = (f"vgprs={report.num_vgprs} sgprs={report.num_sgprs} "
                   f"scratch={report.scratch_bytes} occupancy={report.occupancy} "
                   f"vgpr_spills={report.vgpr_spill_count} sgpr_spills={report.sgpr_spill_count}")
    flag = "  SPILLS" if report.spills else ""
    return f"{report.target:<12} {report.kernel:<52} lds={report.shared_bytes:<6} {figures}{flag}"


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m hip_kernels.aot",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", choices=TARGETS,
                        help="repeatable; default: all of " + ", ".join(TARGETS))
    return parser


def compile_all(targets: list[str], on_report: Any = None) -> bool:
    """Compile every kernel for each target, print one line each and hand each report to
    ``on_report``; True if any spills on AMD."""
    spilled = False
    for target in targets:
        for spec in all_specs(arch_for_target(target)):
            report = compile_spec(spec, target)
            spilled |= report.spills and target.startswith("hip")
            print(format_report(report), flush=True)
            if on_report is not None:
                on_report(report)
    return spilled


def main(argv: list[str] | None = None) -> int:
    """Compile and print; 1 if any kernel spills on AMD."""
    args = build_parser().parse_args(argv)
    return 1 if compile_all(args.target or list(TARGETS)) else 0


if __name__ == "__main__":
    sys.exit(main())
