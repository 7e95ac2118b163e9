"""Fixtures for the benchmark tests: a fake OpenAI server in a subprocess."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_SERVER = Path(__file__).with_name("fake_openai_server.py")
_START_TIMEOUT_S = 20.0


class FakeServer:
    """A running fake server: its base URL and the request bodies it received."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.base_url = f"http://127.0.0.1:{port}"

    def requests(self) -> list[dict]:
        """Every request body received so far."""
        with urllib.request.urlopen(f"{self.base_url}/fake/requests", timeout=10) as resp:
            return list(json.loads(resp.read()))

    def headers(self) -> list[dict[str, str]]:
        """The HTTP headers of every request received so far."""
        with urllib.request.urlopen(f"{self.base_url}/fake/headers", timeout=10) as resp:
            return list(json.loads(resp.read()))

    def stop(self) -> None:
        """Terminate, then kill if it does not exit in time."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _start(*flags: str) -> FakeServer:
    proc = subprocess.Popen([sys.executable, str(_SERVER), *flags], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    # The child prints one whole "PORT n" line once listening, or exits (EOF) on error.
    ready, _, _ = select.select([proc.stdout], [], [], _START_TIMEOUT_S)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("PORT "):
        proc.kill()
        proc.wait(timeout=5)
        raise RuntimeError(f"fake server did not start within {_START_TIMEOUT_S} s: {line!r}")
    return FakeServer(proc, int(line.split()[1]))


@pytest.fixture
def fake_server_factory() -> Iterator[Callable[..., FakeServer]]:
    """Start fake servers with flags (``--token-delay-s 0.01``); all stopped at teardown."""
    servers: list[FakeServer] = []

    def factory(*flags: str) -> FakeServer:
        server = _start(*flags)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def fake_server(fake_server_factory: Callable[..., FakeServer]) -> FakeServer:
    """A fake server with small delays (1 ms first token, 1 ms per token)."""
    return fake_server_factory("--ttft-delay-s", "0.001", "--token-delay-s", "0.001")
