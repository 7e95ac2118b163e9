"""The gloo group among DP ranks, in real processes: sums, barrier, a dead or hung peer."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from support import REPO, free_port

WORKER = r"""
import json, sys, time
from disagg.dp.group import DPGroup, DPGroupError
rank, size, port, scenario = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
timeout_s = 1.0 if scenario == "peer_hangs" else 10.0
g = DPGroup(rank, size, port, timeout_s, rendezvous_timeout_s=60)
out = {"sums": g.sync_state(rank == 1, True), "waited": g.barrier(10.0)}
if rank == size - 1:
    if scenario == "peer_hangs":
        time.sleep(3)
    sys.exit(0)
t0 = time.monotonic()
try:
    g.sync_state(True, False)
    out["second"] = "ok"
except DPGroupError as exc:
    out["second"] = str(exc)
out["second_s"] = time.monotonic() - t0
print(json.dumps(out), flush=True)
"""


def _start(size: int, scenario: str) -> list[subprocess.Popen[str]]:
    port = free_port()
    return [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(size), str(port),
                              scenario], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for r in range(size)]


def _results(procs: list[subprocess.Popen[str]], timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    outs = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            lines = [ln for ln in text.splitlines() if ln.startswith("{")]
            outs.append(json.loads(lines[-1]) if lines else {"log": text})
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    return outs


def test_sums_barrier_and_failing_peers() -> None:
    dies, hangs = _start(3, "peer_dies"), _start(2, "peer_hangs")
    survivors = _results(dies, 90)[:2]
    for r in survivors:
        assert r["sums"] == [1, 3]  # one rank has work, every rank wants to pause
        assert r["waited"] >= 0
        assert "failed (a peer rank died or hung)" in r["second"]
        assert r["second_s"] < 5  # gloo sees the closed connection at once
    waiting = _results(hangs, 90)[0]
    assert "failed" in waiting["second"]
    assert 0.5 < waiting["second_s"] < 5  # the collective's own 1 s deadline


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (Linux /proc/net)."""
    import ipaddress

    found = set()
    for name in ("tcp", "tcp6"):
        with open(f"/proc/net/{name}") as f:
            for line in f.read().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hex_port = local.split(":")
                if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(addr)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(raw)))
    return found


def test_the_rendezvous_store_listens_on_loopback_only() -> None:
    """torch's TCPStore binds every interface; the DP and TP stores must not (anyone on the
    network could write the group's keys)."""
    from disagg.engine.tp import make_store

    store = make_store(0, 2, 0, 5.0)
    assert _listening_addresses(store.port) == {"127.0.0.1"}
    peer = make_store(1, 2, store.port, 5.0)
    peer.set("k", "v")
    assert store.get("k") == b"v"
