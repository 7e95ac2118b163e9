"""``disagg serve``'s HTTP socket: bound before the engine loads weights (a port in use is one
line, at once), and ``--port 0`` reports the port it got everywhere the URL goes (the ready
line, /instance_info, and so the proxy's registration)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
import requests  # type: ignore[import-untyped]
from support import REPO

ARGS = ["builtin:tiny-llama", "--device", "cpu", "--kv-cache-memory-bytes", "16MiB"]


def _serve(*extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", DISAGG_LOG_LEVEL="INFO")
    return subprocess.Popen([sys.executable, "-m", "disagg.cli", "serve", *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=env, start_new_session=True)


def test_a_port_in_use_is_refused_before_the_engine_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve("--port", str(port))
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert out.strip().splitlines()[-1] == \
        f"disagg: error: cannot listen on 127.0.0.1:{port}: Address already in use", out
    assert "model loaded" not in out and "Traceback" not in out, out


def test_port_zero_reports_the_port_it_got() -> None:
    proc = _serve("--port", "0")
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the server exited before it was ready"
            m = re.match(r"disagg: ready on (http://127\.0\.0\.1:(\d+)) ", line)
            url = m.group(1) if m and int(m.group(2)) > 0 else None
        assert url is not None
        info = requests.get(url + "/instance_info", timeout=10).json()
        assert info["http_url"] == url
    finally:
        proc.terminate()
        proc.wait(20)


def _ready_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "the server exited before it was ready"
        m = re.match(r"disagg: ready on (http://\S+:\d+) ", line)
        if m:
            return m.group(1)
    raise AssertionError("not ready in 60 s")


def test_every_address_a_host_name_resolves_to_is_served() -> None:
    """``--host localhost`` serves 127.0.0.1 and ::1 where localhost names both (binding only
    the first would refuse the other, e.g. a proxy given http://127.0.0.1:PORT)."""
    addresses = {str(a[4][0])
                 for a in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
    proc = _serve("--host", "localhost", "--port", "0")
    try:
        port = _ready_url(proc).rsplit(":", 1)[1]
        for address in addresses:
            host = f"[{address}]" if ":" in address else address
            assert requests.get(f"http://{host}:{port}/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(20)


def test_bind_takes_every_address_on_one_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with an IPv4 and an IPv6 address (as localhost often is): both are bound, on
    the same port even with --port 0, and neither listens yet (connections are refused until
    the engine is ready)."""
    from disagg.server.server_main import _bind

    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("this machine has no ::1")
    both = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: both)
    socks = _bind("dual.example", 0)
    try:
        assert [s.getsockname()[0] for s in socks] == ["127.0.0.1", "::1"]
        assert socks[0].getsockname()[1] == socks[1].getsockname()[1] > 0
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", socks[0].getsockname()[1]))
    finally:
        for s in socks:
            s.close()


def test_a_parent_pid_that_is_not_the_parent_is_ignored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """DISAGG_PARENT_PID inherited by a server some other process started must not make it
    shut down; the launcher's own child keeps it."""
    from disagg.server.server_main import _launcher_pid

    monkeypatch.setenv("DISAGG_PARENT_PID", str(os.getppid() + 100000))
    assert _launcher_pid() is None
    monkeypatch.setenv("DISAGG_PARENT_PID", str(os.getppid()))
    assert _launcher_pid() == os.getppid()
    monkeypatch.delenv("DISAGG_PARENT_PID")
    assert _launcher_pid() is None
