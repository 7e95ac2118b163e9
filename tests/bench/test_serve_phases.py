"""``disagg bench serve`` against a server that returns ``disagg_timings``: per-phase stats."""

from __future__ import annotations

import json

import pytest

from bench.serve import main


@pytest.mark.parametrize("usage", [True, False])
def test_per_phase_means_and_percentiles(fake_server_factory, tmp_path, capsys, usage):
    flags = ["--phase-timings"] if usage else ["--phase-timings", "--no-usage"]
    server = fake_server_factory(*flags)
    rc = main(["--base-url", server.base_url, "--model", "builtin:tiny", "--num-prompts", "8",
               "--random-input-len", "16", "--random-output-len", "3", "--disable-tqdm",
               "--result-dir", str(tmp_path), "--results-jsonl", str(tmp_path / "s.jsonl"),
               "--save-result", "--result-filename", "p.json"])
    assert rc == 0
    assert all(b["disagg_timings"] is True for b in server.requests())  # the client asks
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["phase_timed_requests"] == 8
    assert result["phase_names"] == ["ttft", "proxy_queue", "prefill_queue", "prefill_compute",
                                     "kv_transfer", "decode_admission", "first_token",
                                     "prefill_own_queue"]  # the prefill's own object
    for stat in ("mean", "p50", "p90", "p99"):
        assert result[f"{stat}_phase_prefill_compute_ms"] == pytest.approx(4.0)
        assert result[f"{stat}_phase_ttft_ms"] == pytest.approx(10.0)
    row = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[-1])
    assert row["mean_phase_kv_transfer_ms"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert "TTFT phases (server, ms)" in out and "prefill_compute" in out


def test_no_phase_stats_from_a_server_without_them(fake_server, tmp_path):
    assert main(["--base-url", fake_server.base_url, "--model", "builtin:tiny",
                 "--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "2",
                 "--disable-tqdm", "--result-dir", str(tmp_path), "--results-jsonl", "",
                 "--save-result", "--result-filename", "n.json"]) == 0
    result = json.loads((tmp_path / "n.json").read_text())
    assert "phase_timed_requests" not in result and "mean_phase_ttft_ms" not in result
