"""Real `disagg serve` processes on loopback for tests, always cleaned up by their owner."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TEST_PORTS = (10000, 20000)
"""Where tests pick the ports they hand out: below the kernel's ephemeral range (32768+ here),
which sockets bound to port 0 draw from. A port taken from that range is free only until some
socket asks for any port (a KV control plane, an outbound connection), and the instance that
was to listen there binds it seconds later, at the end of its start-up: "address already in
use" (seen in CI). The launcher's runs of ports sit at 20000-32000 (proxy/local_instances.py)."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1, outside the ephemeral range (TEST_PORTS)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*TEST_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {TEST_PORTS} after 200 tries")


@dataclass
class Instance:
    """A running `disagg serve` subprocess."""

    proc: subprocess.Popen[str]
    url: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def kill(self) -> None:
        """SIGKILL the whole instance (API server and engine cores), like a node crash."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # no orphaned engine core survives


def start_instance(args: list[str], tmp_path: object, ready_timeout_s: float = 60.0,
                   expect_ready: bool = True, env: dict[str, str] | None = None, *,
                   host: str = "127.0.0.1", prefix: Sequence[str] = ()) -> Instance:
    """Start `disagg serve` with args; wait (bounded) for its ready line or its exit.

    ``host`` is the HTTP listen address; ``prefix`` goes before the interpreter and must exec
    it in place (e.g. ``ip netns exec NS``), so that killing the process group kills the server.
    The port is picked free on this namespace's loopback; a fresh namespace has every port free.
    """
    return start_instances([args], tmp_path, ready_timeout_s, expect_ready, env, host=host,
                           prefix=prefix)[0]


def stop_all(instances: Sequence[Instance]) -> None:
    """Stop instances together: terminate every one, then wait for each."""
    for inst in instances:
        inst.proc.terminate()
    for inst in instances:
        inst.stop()


def start_instances(arg_lists: Sequence[list[str]], tmp_path: object,
                    ready_timeout_s: float = 60.0, expect_ready: bool = True,
                    env: dict[str, str] | None = None, *, host: str = "127.0.0.1",
                    prefix: Sequence[str] = ()) -> list[Instance]:
    """``start_instance`` for several instances that start at the same time (their start-ups
    overlap); all are ready, or all are stopped and the first failure is raised."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", DISAGG_LOG_LEVEL="WARNING", **(env or {}))
    started: list[Instance] = []
    try:
        for args in arg_lists:
            port = free_port()
            log_path = os.path.join(str(tmp_path), f"serve-{port}.log")
            with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen(
                    [*prefix, sys.executable, "-m", "disagg.cli", "serve", *args,
                     "--host", host, "--port", str(port)],
                    stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                    start_new_session=True)
            started.append(Instance(proc, f"http://{host}:{port}", log_path))
        deadline = time.monotonic() + ready_timeout_s
        for inst in started:
            _wait_ready(inst, max(0.1, deadline - time.monotonic()), expect_ready)
        return started
    except BaseException:
        for inst in started:
            inst.stop()  # nobody owns them yet: an interrupted or failed wait must not leak one
        raise


def _wait_ready(inst: Instance, ready_timeout_s: float, expect_ready: bool) -> Instance:
    """The instance once its ready line shows (or it exits, when that is expected)."""
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if "ready on" in inst.log():
            return inst
        if inst.proc.poll() is not None:
            if expect_ready:
                raise AssertionError(f"instance exited {inst.proc.returncode}: {inst.log()}")
            return inst
        time.sleep(0.1)
    raise AssertionError(f"instance not ready in {ready_timeout_s} s: {inst.log()}")
