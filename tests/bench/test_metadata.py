"""Run metadata: commit, hardware, versions, deployment."""

from __future__ import annotations

from bench.metadata import hardware_summary, run_metadata


def test_run_metadata_has_every_field():
    meta = run_metadata("1P1D tcp read")
    assert meta["deployment"] == "1P1D tcp read"
    assert len(meta["date"]) == 15  # YYYYmmdd-HHMMSS
    assert meta["commit"] is None or len(meta["commit"]) == 40
    hw = meta["hardware"]
    assert hw["cpu"] and hw["cpu_cores"] >= 1 and hw["summary"]
    assert meta["versions"]["python"].count(".") == 2
    assert meta["versions"]["torch"] and meta["versions"]["disagg"]


def test_hardware_override_and_summary():
    assert run_metadata(hardware="8x MI300X")["hardware"]["summary"] == "8x MI300X"
    assert hardware_summary({"gpu": "NVIDIA H200", "num_gpus": 2}) == "2x NVIDIA H200"
    assert hardware_summary({"gpu": None, "cpu": "Xeon", "cpu_cores": 2}) == "Xeon (2 cores)"
