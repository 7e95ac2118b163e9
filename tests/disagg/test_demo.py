"""The README's demo: it says the tiny model's text is noise by design, and the real-model
commands it (and the README quick start) print are ones the real tools accept."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from disagg import demo
from disagg.cli import build_parser
from proxy.launcher import parse_args as parse_proxy_args
from proxy.launcher import proxy_config

REPO_ROOT = Path(__file__).resolve().parents[2]
HF = shutil.which("hf") or str(Path(sys.executable).with_name("hf"))
"""huggingface_hub's CLI: on PATH, or beside this interpreter in a venv."""


def _command(program: str) -> tuple[str, ...]:
    found, = [c for c in demo.REAL_MODEL_COMMANDS if c[0] == program]
    return found


def test_closing_lines_say_the_text_is_gibberish_by_design() -> None:
    lines = demo.next_steps()
    assert "random (seeded) weights" in lines[0] and "gibberish by design" in lines[0]
    assert "  disagg-proxy --launch --model meta-llama/Llama-3.1-8B-Instruct --device cuda" \
        in lines


def test_real_model_command_parses_with_the_real_launcher() -> None:
    argv = _command("disagg-proxy")
    args = parse_proxy_args(list(argv[1:]))
    assert args.launch and (args.model, args.device) == (demo.REAL_MODEL, "cuda")
    assert (args.num_prefill, args.num_decode, args.tp_prefill, args.tp_decode) == (1, 1, 1, 1)
    assert proxy_config(args).model == demo.REAL_MODEL
    # each launched instance gets the model and the device: flags disagg serve accepts
    serve = build_parser().parse_args(["serve", demo.REAL_MODEL, "--device", args.device])
    assert (serve.model, serve.device) == (demo.REAL_MODEL, "cuda")


@pytest.mark.skipif(not Path(HF).exists(), reason="huggingface_hub's hf CLI is absent")
def test_download_command_is_a_real_hf_subcommand() -> None:
    _, subcommand, model = _command("hf")
    assert model == demo.REAL_MODEL
    proc = subprocess.run([HF, subcommand, "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_readme_quick_start_shows_the_same_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    for command in demo.REAL_MODEL_COMMANDS:
        assert " ".join(command) in quick_start


@pytest.mark.slow
def test_demo_runs_and_ends_with_the_next_steps() -> None:
    proc = subprocess.run([sys.executable, "-m", "disagg.demo"], capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.rstrip().splitlines()[-len(demo.next_steps()):] == demo.next_steps()
