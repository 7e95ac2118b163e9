"""Real `disagg serve` processes on loopback for tests, always cleaned up by their owner."""

from __future__ import annotations

import contextlib
import json
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


def raw_http(url: str, data: bytes, timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is to the server at ``url`` (``http://host:port``) and read the answer
    until the server closes: (status, lower-cased headers, body). For requests no HTTP client
    library would send (bad chunk sizes, oversized headers, invalid methods)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


MALFORMED_HTTP = {
    "bad chunk size": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                       b"application/json\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n"
                       b"0\r\n\r\n"),
    "header over 8 KiB": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 20000
                         + b"\r\n\r\n",
    "invalid method": b"G@T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "unknown HTTP version": b"GET /v1/models HTTP/9.1\r\nHost: x\r\n\r\n",
    "URL over 8 KiB": b"GET /v1/models/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "both body lengths": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "non-numeric Content-Length": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Length: abc\r\n\r\n{}"),
    "NUL in a header": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
}
"""Requests aiohttp's HTTP parser refuses before any handler runs."""


def assert_malformed_answer(status: int, headers: dict[str, str], body: bytes) -> None:
    """What every server here answers a MALFORMED_HTTP request: an OpenAI-style 400, short."""
    assert status == 400, (status, body)
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400, error
    assert error["message"].startswith("malformed HTTP request: "), error
    assert len(error["message"]) < 300, error  # not the 20 KiB header quoted back
