"""P/D against colocated: ratios, the loss warning, and ``--compare-colocated`` end to end
against two fake servers of different speeds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench.compare_colocated import (
    RATIO_KEYS,
    compare_point,
    comparison_row,
    format_comparison,
    loss_warning,
)
from bench.serve import main

SLOW = ("--ttft-delay-s", "0.06", "--token-delay-s", "0.01")
FAST = ("--ttft-delay-s", "0.001", "--token-delay-s", "0.001")


def _result(**figures: float | str | None) -> dict:
    base = {"max_concurrency": 4, "request_rate": "inf", "request_goodput": 2.0,
            "request_throughput": 4.0, "output_throughput": 400.0, "mean_ttft_ms": 50.0,
            "p99_ttft_ms": 90.0, "mean_itl_ms": 10.0, "p99_itl_ms": 20.0,
            "deployment": "1P1D", "workload": "random in=8 out=4", "date": "d"}
    base.update(figures)
    return base


def test_ratios_are_pd_over_colocated_and_goodput_decides():
    point = compare_point(_result(), _result(request_goodput=4.0, mean_ttft_ms=25.0,
                                             p99_itl_ms=None), "concurrency")
    assert point["point"] == "c=4" and point["decided_by"] == "request_goodput"
    assert point["ratios"]["request_goodput"] == 0.5
    assert point["ratios"]["mean_ttft_ms"] == 2.0 and point["ratios"]["p99_itl_ms"] is None
    assert point["ratios"]["request_throughput"] == 1.0 and point["pd_loses"]
    warning = loss_warning([point], {"ttft": 100.0})
    assert warning == ("WARNING: P/D loses to colocated on goodput (ttft<=100ms) at 1 of 1 "
                       "point(s) (c=4: 0.50x; P/D/colocated)")


def test_without_slo_request_throughput_decides_and_a_win_warns_nothing():
    win = compare_point(_result(request_goodput=None), _result(request_goodput=None,
                                                               request_throughput=3.0), "rate")
    assert win["decided_by"] == "request_throughput" and not win["pd_loses"]
    assert win["point"] == "r=inf" and loss_warning([win], None) is None
    loss = compare_point(_result(request_goodput=None, request_rate=2.0),
                         _result(request_goodput=None, request_throughput=5.0), "rate")
    warning = loss_warning([win, loss], None)
    assert warning is not None and "request throughput (no --goodput SLO given)" in warning
    assert "at 1 of 2 point(s) (r=2: 0.80x" in warning
    table = format_comparison([win, loss], "P", "C", warning)
    assert table.splitlines()[-1] == warning and "--- r=2 " in table
    row = comparison_row(loss, _result(), _result(deployment="2 x serve"), "cmd")
    assert row["kind"] == "serve-compare" and row["deployment"] == "1P1D vs 2 x serve"
    assert row["figures"]["request_throughput P/D/colocated"] == 0.8
    assert row["workload"] == "random in=8 out=4; r=2"


def _args(pd_url: str, colocated_url: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["--base-url", pd_url, "--compare-colocated", colocated_url, "--model",
            "builtin:tiny", "--num-prompts", "12", "--random-input-len", "24",
            "--random-output-len", "5", "--max-concurrency", "4", "--disable-tqdm",
            "--deployment", "1P1D fake", "--colocated-deployment", "2 x fake serve",
            "--result-dir", str(tmp_path), "--results-jsonl", str(tmp_path / "rows.jsonl"),
            *extra]


def _sent(server) -> Counter:
    return Counter((b["prompt"], b["max_tokens"]) for b in server.requests())


def test_compare_colocated_runs_the_same_workload_and_warns_when_pd_loses(
        fake_server_factory, tmp_path, capsys):
    pd, colocated = fake_server_factory(*SLOW), fake_server_factory(*FAST)
    rc = main(_args(pd.base_url, colocated.base_url, tmp_path, "--goodput", "ttft:40",
                    "--save-result", "--result-filename", "cmp.json", "--seed", "7"))
    out = capsys.readouterr().out
    assert rc == 0
    assert _sent(pd) == _sent(colocated) and sum(_sent(pd).values()) == 13  # probe + 12
    pd_result = json.loads((tmp_path / "cmp-pd.json").read_text())
    colo_result = json.loads((tmp_path / "cmp-colocated.json").read_text())
    assert pd_result["base_url"] == pd.base_url and pd_result["deployment"] == "1P1D fake"
    assert colo_result["base_url"] == colocated.base_url
    assert colo_result["deployment"] == "2 x fake serve"
    assert pd_result["input_lens"] == colo_result["input_lens"]
    assert pd_result["request_goodput"] == 0 < colo_result["request_goodput"]
    compare = json.loads((tmp_path / "cmp-compare.json").read_text())
    (point,) = compare["points"]
    for key, _ in RATIO_KEYS:
        assert point["ratios"][key] == (pytest.approx(pd_result[key] / colo_result[key])
                                        if colo_result[key] else None), key
    assert point["ratios"]["mean_ttft_ms"] > 5 and point["ratios"]["output_throughput"] < 1
    assert point["pd_loses"] and compare["warning"].startswith("WARNING: P/D loses")
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert warnings == [compare["warning"]]
    assert "goodput (ttft<=40ms) at 1 of 1 point(s) (c=4 r=inf: 0.00x" in warnings[0]
    assert "P/D vs colocated" in out and out.count("Serving Benchmark Result") == 2
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["kind"], r.get("compare_role")) for r in rows] == \
        [("serve", "pd"), ("serve", "colocated"), ("serve-compare", None)]
    assert rows[2]["ratios"] == point["ratios"] and rows[2]["pd_loses"]
    assert rows[2]["figures"]["request_goodput P/D/colocated"] == 0


def test_compare_sweep_without_slo_decides_on_throughput_and_plots_both(
        fake_server_factory, tmp_path, capsys):
    pd, colocated = fake_server_factory(*FAST), fake_server_factory(*SLOW)
    rc = main(_args(pd.base_url, colocated.base_url, tmp_path, "--sweep-concurrency", "1,2",
                    "--prompts-per-concurrency", "3", "--result-filename", "sw.json"))
    out = capsys.readouterr().out
    assert rc == 0 and "WARNING" not in out  # the fast P/D wins
    compare = json.loads((tmp_path / "sw-compare.json").read_text())
    assert [p["point"] for p in compare["points"]] == ["c=1", "c=2"]
    assert all(p["decided_by"] == "request_throughput" and not p["pd_loses"]
               for p in compare["points"])
    for name in ("sw-pd-c1.json", "sw-colocated-c2.json", "sw-pd-pareto.png",
                 "sw-colocated-latency.png", "sw-pareto.png"):
        assert (tmp_path / name).exists(), name
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert Counter(r["kind"] for r in rows) == {"serve": 4, "serve-compare": 2}


def test_an_unreachable_colocated_url_fails_before_the_pd_run(fake_server, tmp_path, capsys,
                                                             unused_tcp_port):
    rc = main(_args(fake_server.base_url, f"http://127.0.0.1:{unused_tcp_port}", tmp_path))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and str(unused_tcp_port) in err
    assert len(fake_server.requests()) == 1  # only the P/D probe
