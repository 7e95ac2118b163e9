"""AOT compile results as benchmark rows (bench/aot_rows.py), without compiling anything."""

from __future__ import annotations

import dataclasses
import json

from bench.aot_rows import main, result_row
from hip_kernels import aot as hip_aot
from hip_kernels.aot import CompileReport
from hip_kernels.launch_config import KernelSpec


def _fake_report(spec: KernelSpec, target: str) -> CompileReport:
    """What compile_spec would return, without compiling: AMD or NVIDIA fields by target."""
    if target.startswith("hip"):
        return CompileReport(spec.name, target, 4096, num_vgprs=64, num_sgprs=32,
                             scratch_bytes=0, occupancy=8, vgpr_spill_count=0,
                             sgpr_spill_count=3)
    return CompileReport(spec.name, target, 4096, num_regs=96, spill_bytes=0)


def test_result_row_holds_every_report_field_and_the_run_metadata():
    report = _fake_report(KernelSpec("k[bf16]", None, {}, {}), "hip:gfx942")
    meta = {"date": "20261203-120000", "commit": "abc", "versions": {"triton": "3.9.0"}}
    row = json.loads(json.dumps(result_row(report, meta), allow_nan=False))
    assert row["bench"] == "aot" and row["arch"] == "gfx942" and row["spills"] is False
    assert {f.name: row[f.name] for f in dataclasses.fields(CompileReport)} == \
        dataclasses.asdict(report)
    assert {k: row[k] for k in meta} == meta


def test_cli_appends_one_row_per_spec_and_target(tmp_path, monkeypatch):
    specs = [KernelSpec("a[bf16]", None, {}, {}), KernelSpec("b[fp16]", None, {}, {})]
    monkeypatch.setattr(hip_aot, "all_specs", lambda arch: specs)
    monkeypatch.setattr(hip_aot, "compile_spec", _fake_report)
    out = tmp_path / "results" / "aot.jsonl"
    argv = ["--target", "hip:gfx942", "--target", "cuda:90", "--output", str(out),
            "--commit", "0123abc"]
    assert main(argv) == 0
    assert main(argv[:2] + argv[4:]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["target"], r["kernel"]) for r in rows] == [
        ("hip:gfx942", "a[bf16]"), ("hip:gfx942", "b[fp16]"), ("cuda:90", "a[bf16]"),
        ("cuda:90", "b[fp16]"), ("hip:gfx942", "a[bf16]"), ("hip:gfx942", "b[fp16]")]
    assert all(r["commit"] == "0123abc" and r["date"] and r["versions"]["triton"]
               for r in rows)
    assert rows[0]["num_vgprs"] == 64 and rows[2]["num_regs"] == 96
