"""bench/compare_colocated_gpu.sh --dry-run: the deployments and benchmark commands it would
run, each checked with the real ``disagg serve``, ``disagg-proxy`` and ``disagg bench serve``
parsers; usage errors; shellcheck."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.serve_args import parse as parse_bench_args
from disagg.cli import build_parser as build_disagg_parser
from disagg.cli import engine_config_from_args
from proxy.launcher import parse_args as parse_proxy_args

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "bench" / "compare_colocated_gpu.sh"
TIMEOUT_S = 20


@dataclass
class Command:
    """One command line of the plan: its environment and words, and the comment above it."""

    env: dict[str, str]
    argv: list[str]
    comment: str

    def module_args(self, module: str) -> list[str]:
        """The words after ``python3 -m MODULE``."""
        assert self.argv[:3] == ["python3", "-m", module], self.argv
        return self.argv[3:]


def _env(tmp_dir: Path | None = None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    return env if tmp_dir is None else {**env, "TMPDIR": str(tmp_dir)}


def _run(*args: str, tmp_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=REPO_ROOT, env=_env(tmp_dir))


def _plan(*args: str, tmp_dir: Path | None = None) -> list[Command]:
    proc = _run("--dry-run", *args, tmp_dir=tmp_dir)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    commands, comment = [], ""
    for line in proc.stdout.splitlines():
        if line.startswith("#"):
            comment = line[1:].strip()
            continue
        words = shlex.split(line)
        env = {}
        if words[0] == "env":
            words.pop(0)
            while "=" in words[0]:
                key, _, value = words.pop(0).partition("=")
                env[key] = value
        commands.append(Command(env, words, comment))
        comment = ""
    return commands


def _of(commands: list[Command], module: str) -> list[Command]:
    return [c for c in commands if c.argv[:3] == ["python3", "-m", module]]


def test_default_plan_is_1p1d_then_two_colocated_instances_then_two_workloads(tmp_path):
    commands = _plan(tmp_dir=tmp_path)
    config, pd, serve0, serve1, colocated_proxy, bench_long, bench_mix = commands
    assert config.argv[:2] == ["python3", "-c"] and "SHAPES" in config.argv[2]
    model = config.argv[-1]
    assert model == str(tmp_path / "disagg-llama3-8b-dummy")
    # the printed command writes the dummy model's config.json (the serve lines need it)
    subprocess.run([sys.executable, *config.argv[1:]], check=True, timeout=TIMEOUT_S,
                   cwd=REPO_ROOT)
    assert (Path(model) / "config.json").is_file()
    # P/D: the launcher on GPUs 0 and 1, one prefill and one decode instance
    assert pd.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    launch = parse_proxy_args(pd.module_args("proxy.launcher"))
    assert launch.launch and (launch.num_prefill, launch.num_decode) == (1, 1)
    assert (launch.transport, launch.mode, launch.device, launch.port) == \
        ("tcp", "read", "cuda", 8000)
    assert launch.model == model and launch.instance_base_port == 8100
    assert "--load-format" in launch.instance_args
    # colocated: plain instances, one per GPU, no KV connector
    urls = []
    for gpu, serve in enumerate((serve0, serve1)):
        assert serve.env == {"CUDA_VISIBLE_DEVICES": str(gpu)}
        args = build_disagg_parser().parse_args(serve.module_args("disagg.cli"))
        cfg = engine_config_from_args(args)
        assert args.command == "serve" and cfg.kv_transfer is None
        assert cfg.model.device == "cuda" and args.port == 8200 + gpu
        assert args.served_model_name == ["llama3-8b-dummy"]
        urls.append(f"http://127.0.0.1:{args.port}")
    # their proxy: a decode pool only, every prompt served locally
    proxy = parse_proxy_args(colocated_proxy.module_args("proxy.launcher"))
    assert not proxy.launch and proxy.prefill == [] and proxy.decode == urls
    assert proxy.local_prefill_threshold > 4096 + 256 and proxy.port == 8001
    # one --compare-colocated command per workload, P/D first
    shapes = []
    for bench in (bench_long, bench_mix):
        argv = bench.module_args("bench.cli")
        assert argv[0] == "serve"
        args, plan = parse_bench_args(argv[1:])
        assert args.base_url == "http://127.0.0.1:8000"
        assert args.compare_colocated == "http://127.0.0.1:8001"
        assert args.model == "llama3-8b-dummy" and args.dataset_name == "random"
        assert plan.sweep_axis == "rate" and plan.num_gpus == 2
        assert plan.goodput_slos_ms == {"ttft": 2000.0, "tpot": 50.0}
        assert args.metrics_url == ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]
        assert Path(args.results_jsonl).parent == REPO_ROOT / "bench/results/compare-colocated"
        assert args.deployment.startswith("1P1D") and args.colocated_deployment
        shapes.append((args.random_input_len, args.random_output_len,
                       [p.request_rate for p in plan.points]))
    assert shapes == [(2000, 1000, [1, 2, 4, 8]), (4096, 256, [2, 4, 8, 16])]


def test_four_gpus_and_options():
    commands = _plan("--num-gpus", "4", "--model", "/models/llama", "--transport", "nixl",
                     "--rates", "0.5,1", "--goodput", "ttft:500 e2el:9000", "--base-port",
                     "9000", "--out", "/tmp/x", "--instance-arg=--max-num-seqs",
                     "--instance-arg", "64")
    assert not [c for c in commands if c.argv[:2] == ["python3", "-c"]]  # a real model
    (pd,) = [c for c in _of(commands, "proxy.launcher") if "--launch" in c.argv]
    launch = parse_proxy_args(pd.module_args("proxy.launcher"))
    assert (launch.num_prefill, launch.num_decode, launch.transport) == (2, 2, "nixl")
    assert pd.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and launch.port == 9000
    assert launch.instance_args[-2:] == ["--max-num-seqs", "64"]
    assert "--load-format" not in launch.instance_args
    serves = _of(commands, "disagg.cli")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in serves] == ["0", "1", "2", "3"]
    (proxy,) = [c for c in _of(commands, "proxy.launcher") if "--launch" not in c.argv]
    assert len(parse_proxy_args(proxy.module_args("proxy.launcher")).decode) == 4
    args, plan = parse_bench_args(_of(commands, "bench.cli")[0].module_args("bench.cli")[1:])
    assert [p.request_rate for p in plan.points] == [0.5, 1.0] and plan.num_gpus == 4
    assert plan.goodput_slos_ms == {"ttft": 500.0, "e2el": 9000.0}
    assert args.tokenizer == "/models/llama" and args.model == "llama"
    assert args.results_jsonl == "/tmp/x/serve.jsonl"


@pytest.mark.parametrize(("args", "message"), [
    (("--num-gpus", "3"), "--num-gpus must be even"),
    (("--transport", "mori"), "--transport must be one of: tcp ipc nixl"),
    (("--rates", "1,0"), "--rates takes a comma list of positive numbers"),
    (("--mix-rates", "a"), "--mix-rates takes a comma list"),
    (("--goodput", "ttft=5"), "--goodput takes NAME:MS items"),
    (("--max-model-len", "2048"), "must hold 4096 + 256 tokens"),
    (("--base-port", "19900"), "port 20000 is wanted by both P/D instances and P/D "
                               "connectors"),
    (("--bogus", "1"), "unknown option '--bogus'"),
    (("--model",), "--model needs a value"),
])
def test_bad_arguments_are_one_line_usage_errors(args, message):
    proc = _run("--dry-run", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("compare_colocated_gpu.sh: error: ") and message in line, line


def test_help_lists_every_option_and_the_script_is_executable():
    proc = _run("--help")
    assert proc.returncode == 0
    for flag in ("--model", "--num-gpus", "--transport", "--rates", "--mix-rates", "--goodput",
                 "--kv-bytes", "--out", "--instance-arg", "--dry-run"):
        assert flag in proc.stdout
    assert SCRIPT.stat().st_mode & 0o111


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
    proc = subprocess.run(["shellcheck", "-x", "--severity=style", str(SCRIPT)],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
