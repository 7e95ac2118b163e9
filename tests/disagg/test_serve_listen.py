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
