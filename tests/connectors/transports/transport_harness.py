"""Test helpers: a transport peer in its own process, driven over a pipe with deadlines.

``PeerProcess`` spawns a child that builds a transport, registers a region (a byte pattern or
zeros), and then answers commands: add a peer, read back bytes, post a batch itself, stop.
Every wait has a timeout and cleanup escalates stop -> terminate -> kill, so a failing test
never leaves a process behind.

Run as a script (``serve`` / ``client``), it is the two "hosts" of the network-namespace test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

PIPE_TIMEOUT_S = 60.0


def pattern(num_bytes: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Deterministic bytes; different seeds give different contents."""
    values = torch.arange(num_bytes, dtype=torch.int64, device=device) * 7 + seed * 13
    return (values % 251).to(torch.uint8)


def wait_done(transport: Any, handle: int, timeout_s: float = 30.0) -> tuple[str, str | None]:
    """Poll until not PENDING (bounded); returns (status value, error)."""
    from connectors.transports import TransferStatus

    deadline = time.monotonic() + timeout_s
    while (status := transport.poll(handle)) is TransferStatus.PENDING:
        if time.monotonic() > deadline:
            return "timeout", f"still pending after {timeout_s} s"
        time.sleep(0.001)
    return status.value, transport.error(handle)


def _make_region(nbytes: int, fill: str, device: str) -> torch.Tensor:
    if fill == "zeros":
        return torch.zeros(nbytes, dtype=torch.uint8, device=device)
    return pattern(nbytes, seed=int(fill.removeprefix("pattern")), device=device)


def _peer_main(conn: Connection, name: str, options: dict[str, Any], nbytes: int,
               fill: str, device: str) -> None:
    """Child process body: serve commands until ``stop`` or the pipe goes quiet."""
    from connectors.transports import Segment, TransferOp, make_transport

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    region = _make_region(nbytes, fill, device)
    transport = make_transport(name, agent_name="peer", **options)
    try:
        transport.register_region(region)
        conn.send_bytes(transport.descriptor())
        while conn.poll(PIPE_TIMEOUT_S):
            cmd, *args = conn.recv()
            if cmd == "stop":
                break
            if cmd == "add_peer":
                transport.add_peer(args[0], args[1])
                conn.send("ok")
            elif cmd == "read_back":
                offset, length = args
                conn.send(region[offset:offset + length].cpu().numpy().tobytes())
            elif cmd == "post":
                op, peer, segs = args
                handle = transport.post(TransferOp(op), peer, [Segment(*s) for s in segs])
                conn.send(wait_done(transport, handle))
    finally:
        transport.close()


class PeerProcess:
    """A transport peer in a spawned process (use as a context manager)."""

    def __init__(self, transport: str, nbytes: int, fill: str = "pattern1",
                 options: dict[str, Any] | None = None, device: str = "cpu") -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer_main, daemon=True,
                                args=(child, transport, options or {}, nbytes, fill, device))
        self.proc.start()
        if not self._conn.poll(PIPE_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"peer process sent no descriptor (exit {self.proc.exitcode})")
        self.descriptor = self._conn.recv_bytes()

    def call(self, *cmd: Any, timeout_s: float = PIPE_TIMEOUT_S) -> Any:
        """Send a command and wait (bounded) for its answer."""
        self._conn.send(cmd)
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"peer process did not answer {cmd[0]!r} in {timeout_s} s")
        return self._conn.recv()

    def read_back(self, offset: int, length: int) -> bytes:
        """Bytes of the peer's region."""
        result: bytes = self.call("read_back", offset, length)
        return result

    def signal(self, signum: int) -> None:
        """Send a signal to the peer (SIGKILL = dead peer, SIGSTOP = stalled peer)."""
        if self.proc.pid is not None and self.proc.is_alive():
            os.kill(self.proc.pid, signum)
            if signum == signal.SIGSTOP:
                _wait_stopped(self.proc.pid)
        if signum == signal.SIGKILL:
            self.proc.join(10)

    def close(self) -> None:
        """Stop the child; escalate to terminate/kill on a deadline."""
        if self.proc.is_alive():
            if self.proc.pid is not None:
                os.kill(self.proc.pid, signal.SIGCONT)
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(("stop",))
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Block until every thread of ``pid`` is stopped: kill() returns before a busy thread on
    the other core has taken the SIGSTOP, and may still answer one more request meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_task_state(pid, tid) == "T" for tid in os.listdir(f"/proc/{pid}/task")):
            return
        time.sleep(0.01)
    raise AssertionError(f"peer process {pid} did not stop within {timeout_s} s of SIGSTOP")


def _task_state(pid: int, tid: str) -> str:
    """One thread's state letter from /proc ("T": stopped; a thread gone counts as stopped)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "T"  # an exited thread cannot answer either


REGION_BYTES = 1 << 20
BLOCK_BYTES = 4096


def scattered_segments(seed: int = 0) -> list[Any]:
    """200 whole blocks in a shuffled order, plus odd-sized, odd-aligned pieces after them,
    written to blocks no whole block lands on (a batch's segments never overlap on the remote
    side: their order is unspecified)."""
    from connectors.transports import Segment

    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(REGION_BYTES // BLOCK_BYTES, generator=gen).tolist()
    segs = [Segment(i * BLOCK_BYTES, perm[i] * BLOCK_BYTES, BLOCK_BYTES) for i in range(200)]
    free = [b * BLOCK_BYTES for b in perm[200:203]]
    tail = 200 * BLOCK_BYTES
    segs += [Segment(tail + 1, free[0] + 5, 7), Segment(tail + 100, free[1] + 1001, 333),
             Segment(tail + 5000, free[2] + BLOCK_BYTES - 1, 1)]
    return segs


def layer_segments(layer: int = 2, layer_bytes: int = 1024) -> list[Any]:
    """One layer's slice of many blocks, as a layerwise WRITE posts them: runs of consecutive
    blocks on both sides (one 2D copy each on a GPU), a run stepping by other amounts on each
    side, and odd rows between them that fit no run."""
    from connectors.transports import Segment

    off = layer * layer_bytes
    pairs = [(b, 100 + b) for b in range(20)] + [(b, 110 + b) for b in range(20, 40)]
    pairs += [(50 + 2 * i, 200 + 3 * i) for i in range(10)]  # steps 2 and 3 blocks
    pairs += [(75, 240), (90, 17), (91, 245)]  # no evenly stepping run of three
    return [Segment(lb * BLOCK_BYTES + off, rb * BLOCK_BYTES + off, layer_bytes)
            for lb, rb in pairs]


def check_read(local: Any, peer: PeerProcess, device: str = "cpu",
               segs: list[Any] | None = None) -> None:
    """READ many scattered segments (or ``segs``) from a peer process (fill ``pattern1``);
    compare bytes."""
    from connectors.transports import TransferOp

    region = torch.zeros(REGION_BYTES, dtype=torch.uint8, device=device)
    local.register_region(region)
    local.add_peer("peer", peer.descriptor)
    segs = segs or scattered_segments()
    assert wait_done(local, local.post(TransferOp.READ, "peer", segs)) == ("done", None)
    got_all = region.cpu()
    remote = pattern(REGION_BYTES, seed=1)
    untouched = torch.ones(REGION_BYTES, dtype=torch.bool)
    for seg in segs:
        got = got_all[seg.local_offset:seg.local_offset + seg.length]
        assert torch.equal(got, remote[seg.remote_offset:seg.remote_offset + seg.length]), seg
        untouched[seg.local_offset:seg.local_offset + seg.length] = False
    assert int(got_all[untouched].count_nonzero()) == 0  # nothing written outside the batch


def check_write(local: Any, peer: PeerProcess, peer_fill: str = "zeros",
                device: str = "cpu", segs: list[Any] | None = None) -> None:
    """WRITE many scattered segments (or ``segs``) into a peer, given as an [n, 3] array of
    rows (READs post Segment lists); read its whole region back and compare."""
    from connectors.transports import TransferOp

    region = pattern(REGION_BYTES, seed=2, device=device)
    local.register_region(region)
    local.add_peer("peer", peer.descriptor)
    segs = segs or scattered_segments(seed=3)
    rows = np.array(segs, dtype=np.int64)  # as the P/D worker posts; check_read posts a list
    assert wait_done(local, local.post(TransferOp.WRITE, "peer", rows)) == ("done", None)
    remote = torch.frombuffer(bytearray(peer.read_back(0, REGION_BYTES)), dtype=torch.uint8)
    expected = _make_region(REGION_BYTES, peer_fill, "cpu")
    source = region.cpu()
    for seg in segs:
        expected[seg.remote_offset:seg.remote_offset + seg.length] = \
            source[seg.local_offset:seg.local_offset + seg.length]
    assert torch.equal(remote, expected)


def check_dead_peer(local: Any, peer: PeerProcess, bound_s: float) -> str:
    """Kill the peer after one good READ; the next READ must FAIL within ``bound_s``."""
    from connectors.transports import Segment, TransferOp

    local.register_region(torch.zeros(REGION_BYTES, dtype=torch.uint8))
    local.add_peer("peer", peer.descriptor)
    segs = [Segment(0, 0, 64 * 1024)]
    first = wait_done(local, local.post(TransferOp.READ, "peer", segs))
    assert first == ("done", None), first
    peer.signal(signal.SIGKILL)
    start = time.monotonic()
    status, error = wait_done(local, local.post(TransferOp.READ, "peer", segs),
                              timeout_s=bound_s + 5)
    elapsed = time.monotonic() - start
    assert status == "failed", (status, error)
    assert elapsed < bound_s, f"dead peer took {elapsed:.1f} s to fail"
    assert error
    return error


def _serve(args: argparse.Namespace) -> int:
    """Namespace test, host B: serve a pattern region; answer ``verify`` / ``stop`` on stdin."""
    from connectors.transports import make_transport

    region = pattern(args.nbytes, seed=args.seed)
    transport = make_transport("tcp", agent_name="ns-server", host=args.host)
    transport.register_region(region)
    print(transport.descriptor().hex(), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "verify":
            offset, length, seed = map(int, cmd[1:])
            expected = pattern(args.nbytes, seed=seed)[offset:offset + length]
            print("ok" if torch.equal(region[offset:offset + length], expected) else "bad",
                  flush=True)
        elif cmd and cmd[0] == "stop":
            break
    transport.close()
    return 0


def _client(args: argparse.Namespace) -> int:
    """Namespace test, host A: READ the first half, WRITE the second half; print JSON."""
    from connectors.transports import Segment, TransferOp, make_transport

    local = pattern(args.nbytes, seed=args.seed)
    transport = make_transport("tcp", agent_name="ns-client", host=args.host)
    transport.register_region(local)
    transport.add_peer("ns-server", bytes.fromhex(args.descriptor))
    half = args.nbytes // 2
    block = 4096
    reads = [Segment(o, o, block) for o in range(0, half, 2 * block)]
    read_status = wait_done(transport, transport.post(TransferOp.READ, "ns-server", reads))
    expected = pattern(args.nbytes, seed=args.server_seed)
    read_ok = all(torch.equal(local[o:o + block], expected[o:o + block]) for o, _, _ in reads)
    write = [Segment(half, half, args.nbytes - half)]
    write_status = wait_done(transport, transport.post(TransferOp.WRITE, "ns-server", write))
    print(json.dumps({"read": read_status, "read_ok": read_ok, "write": write_status}),
          flush=True)
    transport.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI for the namespace test: ``serve`` or ``client``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["serve", "client"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--nbytes", type=int, default=1 << 20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-seed", type=int, default=1)
    parser.add_argument("--descriptor", default="")
    args = parser.parse_args(argv)
    return _serve(args) if args.role == "serve" else _client(args)


if __name__ == "__main__":
    raise SystemExit(main())
