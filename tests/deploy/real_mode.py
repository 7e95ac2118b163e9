"""Run single_node.sh for real (not --dry-run) against fake ``disagg`` binaries.

The fakes (fake_disagg.py) record their argv and environment under ``records/<port>.json``
and answer ``/health``; ``deployment`` yields the running script and kills its whole process
group at the end, so a failing test never leaves a process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from deploy_plan import DEPLOY_DIR, clean_env
from support import TEST_PORTS

FAKE = Path(__file__).with_name("fake_disagg.py")
DEADLINE_S = 20.0


def free_port_run(count: int) -> int:
    """A base port with ``count`` free ports above it (checked, then released)."""
    rng = random.Random()
    for _ in range(50):  # outside the ephemeral range, as support.free_port says why
        base = rng.randrange(TEST_PORTS[0], TEST_PORTS[1] - count)
        if all(_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port run")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def fake_bin(tmp_path: Path, tools: Mapping[str, str] | None = None) -> Path:
    """A bin folder with fake ``disagg`` and ``disagg-proxy``, plus ``tools`` (name -> sh
    script body) such as a fake nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {name: f'exec "{sys.executable}" "{FAKE}" {name} "$@"'
               for name in ("disagg", "disagg-proxy")}
    scripts.update(tools or {})
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "records").mkdir()
    return bin_dir


@contextlib.contextmanager
def deployment(tmp_path: Path, base: int | None = None,
               gpu_args: tuple[str, ...] = ("--prefill-gpus", "0", "--decode-gpus", "1"),
               script: str = "single_node.sh", tools: Mapping[str, str] | None = None,
               **env: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``script`` (1P1D, fake binaries) running for real; its group killed at the end.

    Ports: proxy ``base``, prefill ``base + 1``, decode ``base + 2``.
    """
    base = base if base is not None else free_port_run(3)
    proc = subprocess.Popen(
        ["bash", str(DEPLOY_DIR / script), "--model", "m", *gpu_args,
         "--transport", "tcp", "--http-base-port", str(base + 1),
         "--proxy-port", str(base), "--kv-base-port", str(free_port_run(32)),
         "--log-dir", str(tmp_path / "logs"), "--ready-timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=clean_env(PATH=f"{fake_bin(tmp_path, tools)}:{clean_env()['PATH']}",
                      FAKE_RECORD_DIR=str(tmp_path / "records"), **env))
    try:
        yield proc, base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_ready(proc: subprocess.Popen[str]) -> str:
    """The script's stdout up to its ``ready on`` line."""
    assert proc.stdout is not None
    seen = ""
    for line in proc.stdout:
        seen += line
        if "ready on" in line:
            return seen
    raise AssertionError(f"never ready: {seen}{proc.stderr.read() if proc.stderr else ''}")


def records(tmp_path: Path) -> dict[int, dict[str, object]]:
    """What each fake recorded, by its HTTP port."""
    return {int(p.stem): json.loads(p.read_text())
            for p in (tmp_path / "records").glob("*.json")}


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (waits up to DEADLINE_S)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
