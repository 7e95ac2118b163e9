"""tcp transport across two network namespaces joined by a veth pair: two "hosts".

Each side runs in its own namespace with a private 10.x address, so the bytes cross a real
(virtual) link instead of loopback. Needs root and ``ip netns``; skipped with the reason if
either is missing. Namespaces and processes are always removed in finalizers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import ip, netns_unavailable

_HARNESS = Path(__file__).resolve().parent / "transport_harness.py"
_REPO_ROOT = Path(__file__).resolve().parents[3]
_NBYTES = 1 << 20
_STEP_TIMEOUT_S = 60.0


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str, str]]:
    """(ns_a, addr_a, ns_b, addr_b): two namespaces linked by a veth pair."""
    reason = netns_unavailable("dgprobe")
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    tag = os.getpid() % 100000
    ns_a, ns_b = f"dg-tcp-a-{tag}", f"dg-tcp-b-{tag}"
    veth_a, veth_b = f"dgva{tag}", f"dgvb{tag}"
    addr_a, addr_b = "10.231.7.1", "10.231.7.2"
    try:
        setup = [
            ("netns", "add", ns_a), ("netns", "add", ns_b),
            ("link", "add", veth_a, "type", "veth", "peer", "name", veth_b),
            ("link", "set", veth_a, "netns", ns_a), ("link", "set", veth_b, "netns", ns_b),
            ("-n", ns_a, "addr", "add", f"{addr_a}/30", "dev", veth_a),
            ("-n", ns_b, "addr", "add", f"{addr_b}/30", "dev", veth_b),
            ("-n", ns_a, "link", "set", veth_a, "up"), ("-n", ns_b, "link", "set", veth_b, "up"),
            ("-n", ns_a, "link", "set", "lo", "up"), ("-n", ns_b, "link", "set", "lo", "up"),
        ]
        for step in setup:
            result = ip(*step)
            assert result.returncode == 0, f"ip {' '.join(step)}: {result.stderr}"
        yield ns_a, addr_a, ns_b, addr_b
    finally:
        # Deleting a namespace also deletes the veth end inside it (and so the pair).
        ip("netns", "del", ns_a)
        ip("netns", "del", ns_b)
        ip("link", "del", veth_a)


def _in_netns(ns: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(_REPO_ROOT))
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(_HARNESS), *args],
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _read_line(proc: subprocess.Popen[str]) -> str:
    """One stdout line, bounded: a wedged child is killed rather than hanging the test."""
    assert proc.stdout is not None
    timer = threading.Timer(_STEP_TIMEOUT_S, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline().strip()
    finally:
        timer.cancel()
    if not line and proc.stderr is not None and proc.poll() is not None:
        raise AssertionError(f"child exited: {proc.stderr.read()[-2000:]}")
    return line


def test_read_and_write_across_namespaces(two_hosts: tuple[str, str, str, str]) -> None:
    ns_a, addr_a, ns_b, addr_b = two_hosts
    server = _in_netns(ns_b, "serve", "--host", addr_b, "--nbytes", str(_NBYTES), "--seed", "1",
                       stdin=subprocess.PIPE)
    client = None
    try:
        descriptor = _read_line(server)
        assert descriptor, "server printed no descriptor"
        client = _in_netns(ns_a, "client", "--host", addr_a, "--nbytes", str(_NBYTES),
                           "--seed", "0", "--server-seed", "1", "--descriptor", descriptor)
        result = json.loads(_read_line(client))
        assert result == {"read": ["done", None], "read_ok": True, "write": ["done", None]}
        assert server.stdin is not None
        half = _NBYTES // 2
        server.stdin.write(f"verify {half} {_NBYTES - half} 0\n")
        server.stdin.flush()
        assert _read_line(server) == "ok"  # the client's pattern landed in the server's half
        server.stdin.write("stop\n")
        server.stdin.flush()
        assert server.wait(_STEP_TIMEOUT_S) == 0
    finally:
        _reap(server)
        if client is not None:
            _reap(client)
