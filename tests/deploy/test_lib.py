"""lib.sh's real (not dry) mode, driven through single_node.sh with fake ``disagg`` binaries:
preflight, start-up waits, one-line failures, and that every child is stopped at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_plan import DEPLOY_DIR, clean_env

FAKE = Path(__file__).with_name("fake_disagg.py")
DEADLINE_S = 20.0

pytestmark = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="the scripts' health waits use curl")


def _free_port_run(count: int) -> int:
    """A base port with ``count`` free ports above it (checked, then released)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count < 65000 and all(_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port run")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("disagg", "disagg-proxy"):
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" {name} "$@"\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "records").mkdir()
    return bin_dir


@contextlib.contextmanager
def _deployment(tmp_path: Path, base: int | None = None,
                gpu_args: tuple[str, ...] = ("--prefill-gpus", "0", "--decode-gpus", "1"),
                **env: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """single_node.sh (1P1D, fake binaries) running for real; its group killed at the end.

    Ports: proxy ``base``, prefill ``base + 1``, decode ``base + 2``.
    """
    base = base if base is not None else _free_port_run(3)
    proc = subprocess.Popen(
        ["bash", str(DEPLOY_DIR / "single_node.sh"), "--model", "m", *gpu_args,
         "--transport", "tcp", "--http-base-port", str(base + 1),
         "--proxy-port", str(base), "--kv-base-port", str(_free_port_run(32)),
         "--log-dir", str(tmp_path / "logs"), "--ready-timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=clean_env(PATH=f"{_fake_bin(tmp_path)}:{clean_env()['PATH']}",
                      FAKE_RECORD_DIR=str(tmp_path / "records"), **env))
    try:
        yield proc, base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _wait_ready(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    seen = ""
    for line in proc.stdout:
        seen += line
        if "ready on" in line:
            return seen
    raise AssertionError(f"never ready: {seen}{proc.stderr.read() if proc.stderr else ''}")


def _records(tmp_path: Path) -> dict[int, dict[str, object]]:
    return {int(p.stem): json.loads(p.read_text())
            for p in (tmp_path / "records").glob("*.json")}


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_instances_then_proxy_start_and_a_dead_instance_stops_everything(
        tmp_path: Path) -> None:
    with _deployment(tmp_path) as (proc, base):
        out = _wait_ready(proc)
        records = _records(tmp_path)
        assert sorted(records) == [base, base + 1, base + 2]
        assert "started prefill-0" in out and "started proxy" in out
        assert records[base + 1]["HIP_VISIBLE_DEVICES"] == "0"
        assert records[base + 2]["HIP_VISIBLE_DEVICES"] == "1"
        proxy_argv = records[base]["argv"]
        assert isinstance(proxy_argv, list)
        assert proxy_argv[proxy_argv.index("--decode") + 1] == f"http://127.0.0.1:{base + 2}"
        os.kill(int(str(records[base + 2]["pid"])), signal.SIGKILL)
        assert proc.wait(DEADLINE_S) == 1
        assert proc.stderr is not None
        err = proc.stderr.read().strip().splitlines()
        assert err[-1].startswith("single_node.sh: decode-0 exited")
        assert "stopping everything" in err[-1]
        assert _gone(int(str(records[base + 1]["pid"])))
        assert _gone(int(str(records[base]["pid"])))


def test_sigterm_stops_every_child_and_exits_0(tmp_path: Path) -> None:
    with _deployment(tmp_path) as (proc, _):
        _wait_ready(proc)
        pids = [int(str(r["pid"])) for r in _records(tmp_path).values()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE_S) == 0
        assert all(_gone(pid) for pid in pids)


def test_tp_instances_run_on_their_own_gpus_with_their_tp_size(tmp_path: Path) -> None:
    gpus = ("--prefill-gpus", "0,1", "--decode-gpus", "2,3,4,5", "--tp-prefill", "2",
            "--tp-decode", "2")
    with _deployment(tmp_path, gpu_args=gpus) as (proc, base):
        _wait_ready(proc)
        records = _records(tmp_path)
        prefill, decode = records[base + 1], records[base + 2]
        assert (prefill["HIP_VISIBLE_DEVICES"], decode["HIP_VISIBLE_DEVICES"]) == \
            ("0,1", "2,3,4,5")
        for record, dp in ((prefill, "1"), (decode, "2")):
            argv = record["argv"]
            assert isinstance(argv, list)
            assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
            assert argv[argv.index("--data-parallel-size") + 1] == dp


def test_too_few_gpus_for_the_tp_size_start_nothing(tmp_path: Path) -> None:
    gpus = ("--prefill-gpus", "0", "--decode-gpus", "1,2", "--tp-decode", "4")
    with _deployment(tmp_path, gpu_args=gpus) as (proc, _):
        assert proc.wait(DEADLINE_S) == 2
        assert proc.stderr is not None
        assert proc.stderr.read().strip() == ("single_node.sh: error: 1 decode instance(s) x "
                                              "tp 4 need 4 GPUs; --decode-gpus lists 2")
        assert _records(tmp_path) == {} and not (tmp_path / "logs").exists()


def test_failed_preflight_starts_nothing(tmp_path: Path) -> None:
    with _deployment(tmp_path, FAKE_DOCTOR_FAIL="1") as (proc, _):
        assert proc.wait(DEADLINE_S) == 1
        assert proc.stderr is not None
        assert proc.stderr.read().strip() == (
            f"single_node.sh: this node cannot use the tcp transport (see "
            f"{tmp_path / 'logs'}/doctor.txt)")
        assert _records(tmp_path) == {}


def test_an_instance_dying_during_start_up_is_one_line(tmp_path: Path) -> None:
    base = _free_port_run(3)
    with _deployment(tmp_path, base, FAKE_EXIT_PORT=str(base + 2)) as (proc, _):
        assert proc.wait(DEADLINE_S) == 1
        assert proc.stderr is not None
        assert proc.stderr.read().strip().splitlines()[-1] == (
            f"single_node.sh: decode-0 exited during start-up; see "
            f"{tmp_path / 'logs'}/decode-0.log")
        prefill_pid = int(str(_records(tmp_path)[base + 1]["pid"]))
        assert _gone(prefill_pid)
