"""The README benchmark table is generated from result rows."""

from __future__ import annotations

import json

from bench.readme_table import main

SERVE = {"kind": "serve", "hardware": {"summary": "8x AMD Instinct MI300X"},
         "model_id": "llama-3-8b", "workload": "random in=1024 out=128",
         "deployment": "1P1D tcp read", "max_concurrency": 64, "request_rate": "inf",
         "command": "disagg bench serve --max-concurrency 64", "output_throughput": 1234.5,
         "request_throughput": 9.64, "median_ttft_ms": 55.0, "p99_ttft_ms": 120.0,
         "median_tpot_ms": 12.3, "p99_itl_ms": 30.0, "request_goodput": None, "failed": 0}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_has_one_row_per_latest_measurement(tmp_path, capsys):
    old = dict(SERVE, output_throughput=1.0)
    _write(tmp_path / "serve.jsonl", [old, SERVE])
    _write(tmp_path / "throughput.jsonl", [{
        "kind": "throughput", "hardware": {"summary": "1x H100"}, "model": "llama-3-8b-dummy",
        "workload": "256 seqs", "command": "disagg bench throughput --model x",
        "output_throughput": 5000.0, "total_token_throughput": 9000.0}])
    _write(tmp_path / "transfer.jsonl", [{
        "kind": "transfer", "hardware": "2x H200", "model": "-", "workload": "256 x 2 MiB",
        "command": "disagg bench transfer", "figures": {"GB/s": 250.5, "of ceiling": 0.63}}])
    assert main(["--results-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| Hardware | Model | Workload | Key figures | Command |")
    assert len(lines) == 5  # header, rule, serve (latest only), throughput, transfer
    serve = next(line for line in lines if "MI300X" in line)
    assert "1234 out tok/s" in serve and "TTFT p50/p99 55.0/120.0 ms" in serve
    assert "1P1D tcp read; random in=1024 out=128; concurrency 64" in serve
    assert "`disagg bench serve --max-concurrency 64`" in serve
    assert any("5000 out tok/s, 9000 total tok/s" in line for line in lines)
    assert any("GB/s 250, of ceiling 0.63" in line for line in lines)


def test_all_rows_and_kind_filter(tmp_path, capsys):
    _write(tmp_path / "serve.jsonl", [SERVE, dict(SERVE, command="a | b")])
    assert main(["--results-dir", str(tmp_path), "--all", "--kinds", "serve"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and "`a \\| b`" in lines[-1]  # pipes escaped inside cells


def test_no_rows_is_one_line_exit_2(tmp_path, capsys):
    assert main(["--results-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no result rows in {tmp_path}/*.jsonl")
    assert main(["--results-dir", str(tmp_path / "nope")]) == 2

