"""``disagg bench serve`` end to end against the fake server: results, sweeps, failures, scale."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench.serve import main

VLLM_KEYS = ("date", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
             "max_concurrency", "duration", "completed", "failed", "total_input_tokens",
             "total_output_tokens", "request_throughput", "request_goodput",
             "output_throughput", "total_token_throughput", "input_lens", "output_lens",
             "ttfts", "itls", "errors", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms",
             "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms",
             "mean_e2el_ms", "p99_e2el_ms", "max_concurrent_requests")


def _args(base_url: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["--base-url", base_url, "--model", "builtin:tiny", "--num-prompts", "20",
            "--random-input-len", "32", "--random-output-len", "6", "--disable-tqdm",
            "--result-dir", str(tmp_path), "--results-jsonl", str(tmp_path / "serve.jsonl"),
            *extra]


def test_single_run_saves_vllm_compatible_result_and_row(fake_server, tmp_path, capsys):
    rc = main(_args(fake_server.base_url, tmp_path, "--save-result", "--result-filename",
                    "r.json", "--max-concurrency", "5", "--goodput", "ttft:10000",
                    "--deployment", "1P1D tcp read", "--num-warmups", "2"))
    assert rc == 0
    result = json.loads((tmp_path / "r.json").read_text())
    for key in VLLM_KEYS:
        assert key in result, key
    assert result["completed"] == 20 and result["failed"] == 0
    assert result["total_input_tokens"] == 20 * 32 and result["total_output_tokens"] == 20 * 6
    assert result["input_lens"] == [32] * 20 and result["output_lens"] == [6] * 20
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["max_concurrency"] == 5 and result["request_rate"] == "inf"
    assert result["deployment"] == "1P1D tcp read" and result["versions"]["torch"]
    assert result["hardware"]["cpu_cores"] >= 1 and result["client_cpu_ms_per_request"] > 0
    # the fake saw the probe, 2 warm-ups and 20 measured requests, prompts token-exact
    bodies = fake_server.requests()
    assert len(bodies) == 23 and all(len(b["prompt"]) == 31 for b in bodies)  # + BOS = 32
    row = json.loads((tmp_path / "serve.jsonl").read_text().splitlines()[-1])
    assert row["completed"] == 20 and "ttfts" not in row and "itls" not in row
    assert row["command"].startswith("disagg bench serve --base-url")
    assert "Serving Benchmark Result" in capsys.readouterr().out


def _multi_turn_args(base_url: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["--base-url", base_url, "--model", "builtin:tiny", "--dataset-name", "multi-turn",
            "--multi-turn-conversations", "3", "--multi-turn-turns", "3",
            "--multi-turn-system-len", "20", "--multi-turn-user-len", "8",
            "--multi-turn-output-len", "2", "--max-concurrency", "2", "--disable-tqdm",
            "--result-dir", str(tmp_path), "--results-jsonl", str(tmp_path / "serve.jsonl"),
            "--save-result", "--result-filename", "mt.json", "--metrics-url", base_url, *extra]


def test_multi_turn_sends_turns_in_order_with_the_answers(fake_server, tmp_path, capsys):
    rc = main(_multi_turn_args(fake_server.base_url, tmp_path, "--num-warmups", "1"))
    assert rc == 0
    result = json.loads((tmp_path / "mt.json").read_text())
    assert result["completed"] == 9 and result["num_prompts"] == 9
    assert result["workload"] == ("multi-turn 3 conversations x 3 turns, system=20 user=8 "
                                  "out=2")
    # the probe and the warm-up are the first turn of an extra conversation, then 3 x 3 turns
    prompts = [b["prompt"] for b in fake_server.requests()][2:]
    assert len(prompts) == 9
    for first in (p for p in prompts if p.count("User:") == 1):
        turns = [p for p in prompts if p.startswith(first[:20])]
        assert [t.count("User:") for t in turns] == [1, 2, 3]  # sent in order
        assert turns[1].startswith(first + "t0 t1 ") and turns[2].startswith(turns[1] + "t0 t1 ")
    # BOS + 20 + "\nUser: " 7 + 8 + "\nAssistant:" 11, then + answer "t0 t1 " 6 + 26 per turn
    assert result["input_lens"] == [47, 79, 111] * 3
    # the toy cache of the fake: each later turn hits its whole previous prompt
    assert 0.3 < result["prefix_cache_hit_rate"] < 1
    assert result["kv_bytes_moved_per_request"] == pytest.approx(
        result["kv_bytes_moved"] / 9)
    row = json.loads((tmp_path / "serve.jsonl").read_text().splitlines()[-1])
    for key in ("prefix_cache_hit_rate", "prefix_cache_queries", "prefix_cache_hits",
                "kv_bytes_moved_per_request", "instance_counters", "metrics_urls"):
        assert row[key] == result[key], key
    assert "Prefix cache hit rate:" in capsys.readouterr().out


def test_shared_prefix_hit_rate_and_bytes_moved(fake_server, tmp_path):
    rc = main(_args(fake_server.base_url, tmp_path, "--dataset-name", "shared-prefix",
                    "--shared-prefix-groups", "2", "--shared-prefix-len", "64", "--save-result",
                    "--result-filename", "sp.json", "--metrics-url", fake_server.base_url))
    assert rc == 0
    result = json.loads((tmp_path / "sp.json").read_text())
    # every prompt is BOS-less 64 + 31 chars: at least the group prefix hits, once cached
    assert result["completed"] == 20 and result["prefix_cache_queries"] == 20 * 95
    assert result["prefix_cache_hits"] >= 18 * 64
    assert result["kv_bytes_moved_per_request"] < 95 * 8


def test_unreachable_metrics_url_fails_with_one_line(fake_server, tmp_path, capsys,
                                                     unused_tcp_port):
    rc = main(_args(fake_server.base_url, tmp_path, "--metrics-url",
                    f"http://127.0.0.1:{unused_tcp_port}"))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert f"cannot read http://127.0.0.1:{unused_tcp_port}/metrics" in err


def test_failed_requests_are_counted_with_their_errors(fake_server_factory, tmp_path):
    server = fake_server_factory("--fail-every", "4", "--no-record")
    # the probe is request 1, so measured requests 3, 7, 11, 15, 19 (1-based) fail
    assert main(_args(server.base_url, tmp_path, "--save-result", "--result-filename",
                      "f.json", "--max-concurrency", "1")) == 0
    result = json.loads((tmp_path / "f.json").read_text())
    assert result["failed"] == 5 and result["completed"] == 15
    errors = [e for e in result["errors"] if e]
    assert len(errors) == 5 and all("injected failure" in e for e in errors)
    assert result["output_lens"].count(0) == 5


def test_concurrency_sweep_writes_one_json_per_point_and_plots(fake_server, tmp_path):
    rc = main(_args(fake_server.base_url, tmp_path, "--sweep-concurrency", "1,4,8",
                    "--result-filename", "sweep.json"))
    assert rc == 0
    for c in (1, 4, 8):
        result = json.loads((tmp_path / f"sweep-c{c}.json").read_text())
        assert result["max_concurrency"] == c and result["completed"] == 20
    for kind in ("latency", "throughput", "ttft"):
        png = tmp_path / f"sweep-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "serve.jsonl").read_text().splitlines()
    assert [json.loads(r)["max_concurrency"] for r in rows] == [1, 4, 8]


def test_rate_sweep_names_each_point(fake_server, tmp_path):
    rc = main(_args(fake_server.base_url, tmp_path, "--sweep-rate", "200,400.5",
                    "--burstiness", "0.5"))
    assert rc == 0
    names = sorted(p.name for p in tmp_path.glob("serve-*qps*.json"))
    assert len(names) == 2
    assert names[0].endswith("-r200.json") and names[1].endswith("-r400.5.json")
    assert (tmp_path / "serve-sweep-latency.png").exists()


def test_prompts_per_concurrency_scales_each_point(fake_server, tmp_path):
    rc = main(_args(fake_server.base_url, tmp_path, "--sweep-concurrency", "1,2",
                    "--prompts-per-concurrency", "3", "--result-filename", "p.json"))
    assert rc == 0
    assert json.loads((tmp_path / "p-c1.json").read_text())["completed"] == 3
    assert json.loads((tmp_path / "p-c2.json").read_text())["completed"] == 6


@pytest.mark.timeout(60)
def test_a_thousand_concurrent_streams_complete(fake_server_factory, tmp_path):
    # every request holds its stream open ~0.3 s, so all 1,000 are in flight together
    server = fake_server_factory("--ttft-delay-s", "0.2", "--token-delay-s", "0.02",
                                 "--no-record")
    start_s = time.monotonic()
    rc = main(["--base-url", server.base_url, "--model", "builtin:tiny", "--num-prompts",
               "1000", "--random-input-len", "16", "--random-output-len", "4",
               "--max-concurrency", "1000", "--disable-tqdm", "--save-result",
               "--result-dir", str(tmp_path), "--result-filename", "k.json",
               "--results-jsonl", ""])
    elapsed_s = time.monotonic() - start_s
    result = json.loads((tmp_path / "k.json").read_text())
    assert rc == 0 and result["completed"] == 1000 and result["failed"] == 0
    assert result["max_concurrent_requests"] >= 900
    assert result["total_output_tokens"] == 4000
    assert elapsed_s < 15 and result["client_cpu_ms_per_request"] < 5


def test_unreachable_endpoint_fails_fast_with_one_line(tmp_path, capsys, unused_tcp_port):
    rc = main(_args(f"http://127.0.0.1:{unused_tcp_port}", tmp_path))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("disagg bench serve: error: the test request to")


@pytest.mark.parametrize("extra, message", [
    (["--goodput", "ttft=5"], "--goodput takes NAME:MS"),
    (["--sweep-concurrency", "1,2", "--sweep-rate", "3"], "one axis at a time"),
    (["--sweep-concurrency", "1,x"], "--sweep-concurrency takes"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1"),
    (["--extra-body", "{nope"], "--extra-body is not valid JSON"),
    (["--metric-percentiles", "101"], "--metric-percentiles"),
    (["--random-range-ratio", "2"], "--random-range-ratio"),
    (["--endpoint", "/v2/x"], "invalid choice"),
])
def test_user_errors_give_one_line_and_exit_2(tmp_path, capsys, extra, message):
    rc = main(_args("http://127.0.0.1:9", tmp_path, *extra))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
    assert err.startswith("disagg bench serve: error:")


def test_missing_model_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "--model" in capsys.readouterr().err


def test_an_uncached_hub_id_is_one_line_not_byte_ids(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    argv = _args("http://127.0.0.1:9", tmp_path)
    argv[argv.index("--model") + 1] = "acme/not-cached"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'acme/not-cached'" in err and "local cache" in err


def test_results_jsonl_defaults_to_none():
    from bench.serve_args import parse

    args, _ = parse(["--model", "builtin:tiny"])
    assert args.results_jsonl == ""


def test_headers_metadata_and_vllm_per_request_lists(fake_server, tmp_path):
    rc = main(_args(fake_server.base_url, tmp_path, "--save-result", "--result-filename",
                    "h.json", "--api-key", "k1", "--header", "x-tenant=blue",
                    "Authorization=Bearer k2", "--metadata", "tp=1", "build = nightly",
                    "--max-concurrency", "4", "--deployment", "2P1D tcp read"))
    assert rc == 0
    # the probe and every measured request carry the headers; --header overrides --api-key
    headers = fake_server.headers()
    assert len(headers) == 21
    assert all(h["x-tenant"] == "blue" and h["Authorization"] == "Bearer k2" for h in headers)
    result = json.loads((tmp_path / "h.json").read_text())
    assert result["metadata"] == {"tp": "1", "build": "nightly"}
    assert len(result["latencies"]) == len(result["start_times"]) == 20
    assert result["latencies"] == pytest.approx(
        [t + sum(itl) for t, itl in zip(result["ttfts"], result["itls"], strict=True)])
    assert min(result["start_times"]) >= 0
    assert max(result["start_times"]) < result["duration"]
    # --num-gpus defaults to x + y of "xPyD" in --deployment
    assert result["num_gpus"] == 3
    assert result["output_throughput_per_gpu"] == pytest.approx(result["output_throughput"] / 3)
    assert result["output_throughput_per_user"] == pytest.approx(1000 / result["mean_tpot_ms"])
    row = json.loads((tmp_path / "serve.jsonl").read_text().splitlines()[-1])
    assert row["metadata"] == result["metadata"]
    assert "latencies" not in row and "start_times" not in row


def test_sharegpt_dataset_end_to_end(fake_server, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": f"question {i:02d}"},
                               {"from": "gpt", "value": "answer " * (i + 1)}]}
            for i in range(30)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows))
    rc = main(_args(fake_server.base_url, tmp_path, "--dataset-name", "sharegpt",
                    "--dataset-path", str(path), "--num-gpus", "2", "--save-result",
                    "--result-filename", "sg.json"))
    assert rc == 0
    result = json.loads((tmp_path / "sg.json").read_text())
    assert result["workload"] == "sharegpt sharegpt.json" and result["num_gpus"] == 2
    sent = {b["prompt"]: b["max_tokens"] for b in fake_server.requests()[1:]}
    assert len(sent) == 20
    for prompt, max_tokens in sent.items():  # "answer " x (i + 1): 7 tokens each
        assert max_tokens == 7 * (int(prompt.split()[1]) + 1)


@pytest.mark.parametrize("extra, message", [
    (["--dataset-name", "sharegpt"], "--dataset-name sharegpt needs --dataset-path"),
    (["--dataset-name", "custom", "--dataset-path", "/nonexistent.jsonl"], "no such file"),
    (["--header", "novalue"], "--header takes KEY=VALUE pairs, got 'novalue'"),
    (["--metadata", "=x"], "--metadata takes KEY=VALUE pairs"),
    (["--num-gpus", "0"], "--num-gpus must be at least 1"),
    (["--compare-colocated", "http://127.0.0.1:9/"], "must name another deployment"),
])
def test_new_flag_errors_are_one_line(tmp_path, capsys, extra, message):
    rc = main(_args("http://127.0.0.1:9", tmp_path, *extra))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
