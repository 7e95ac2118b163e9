"""``disagg bench transfer``: KV transport throughput between two processes, against a ceiling.

The bench process is the initiator; it spawns a target process, the two swap transport
descriptors over a pipe, and the initiator times READ or WRITE batches of ``num_blocks`` blocks
of ``block_bytes`` bytes. Remote blocks sit at every other slot (``--layout strided``) so no
two merge, as with a fragmented KV cache; ``--layout contiguous`` lets them merge. The same run
measures the ceiling: a host memcpy of the same bytes on CPU, a device-to-device copy on GPU.
Each configuration appends one JSON row to ``bench/results/transfer.jsonl``.

    python -m bench.transfer --transport tcp --mode read --num-blocks 256 --block-bytes 262144
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "transfer.jsonl"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_PIPE_TIMEOUT_S = 120.0
_TRANSFER_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One measured configuration."""

    transport: str
    mode: str
    num_blocks: int
    block_bytes: int
    device: str
    layout: str
    iters: int
    warmup: int
    options: dict[str, Any] = field(default_factory=dict)


class BenchError(Exception):
    """A user-facing failure (bad option, transport unavailable, failed transfer)."""


def _pattern(num_bytes: int, device: str) -> torch.Tensor:
    """Deterministic non-trivial bytes (period 251, a prime, so shifted blocks differ)."""
    return (torch.arange(num_bytes, dtype=torch.int64, device=device) % 251).to(torch.uint8)


def _device_for(device: str, role: str) -> str:
    """cuda:0 for the initiator; the target takes cuda:1 when there are two GPUs."""
    if device == "cpu":
        return "cpu"
    index = 1 if role == "target" and torch.cuda.device_count() > 1 else 0
    return f"cuda:{index}"


def _remote_slot(i: int, layout: str) -> int:
    return 2 * i if layout == "strided" else i


def _segments(cfg: BenchConfig) -> Any:
    """The batch as the P/D worker posts it: (local, remote, length) rows of whole blocks."""
    from connectors.pd_worker import block_rows

    local = list(range(cfg.num_blocks))
    return block_rows(local, [_remote_slot(i, cfg.layout) for i in local], cfg.block_bytes,
                      0, cfg.block_bytes)


def _target_main(conn: Connection, cfg: BenchConfig) -> None:
    """Target process: serve a region until told to stop; verify WRITEs on request."""
    from connectors.transports import make_transport

    device = _device_for(cfg.device, "target")
    region_bytes = 2 * cfg.num_blocks * cfg.block_bytes
    region = _pattern(region_bytes, device) if cfg.mode == "read" else \
        torch.zeros(region_bytes, dtype=torch.uint8, device=device)
    transport = make_transport(cfg.transport, agent_name="bench-target", **cfg.options)
    try:
        transport.register_region(region)
        conn.send_bytes(transport.descriptor())
        transport.add_peer("bench-initiator", conn.recv_bytes())
        conn.send("ready")
        while conn.poll(_PIPE_TIMEOUT_S):
            message = conn.recv()
            if message == "stop":
                break
            conn.send(_verify_written(region, cfg))
    finally:
        transport.close()


def _verify_written(region: torch.Tensor, cfg: BenchConfig) -> bool:
    """Target side of a WRITE run: every written block holds the initiator's bytes."""
    expected = _pattern(cfg.num_blocks * cfg.block_bytes, str(region.device))
    for i in range(cfg.num_blocks):
        start = _remote_slot(i, cfg.layout) * cfg.block_bytes
        chunk = expected[i * cfg.block_bytes:(i + 1) * cfg.block_bytes]
        if not torch.equal(region[start:start + cfg.block_bytes], chunk):
            return False
    return True


def _wait(transport: Any, handle: int, pause_s: float) -> None:
    """Spin on poll (sleeping ``pause_s``, which yields the GIL to the transport's threads)
    until DONE."""
    from connectors.transports import TransferStatus

    deadline = time.monotonic() + _TRANSFER_TIMEOUT_S
    while (status := transport.poll(handle)) is TransferStatus.PENDING:
        if time.monotonic() > deadline:
            raise BenchError(f"transfer still pending after {_TRANSFER_TIMEOUT_S:.0f} s")
        time.sleep(pause_s)
    if status is not TransferStatus.DONE:
        raise BenchError(f"transfer failed: {transport.error(handle)}")
    transport.release(handle)


def _timed_runs(transport: Any, cfg: BenchConfig) -> tuple[list[float], list[float]]:
    """Warm-up, then ``iters`` timed batches; seconds per batch, and per ``post`` call alone
    (the host's share: the copies cannot start before it)."""
    from connectors.transports import TransferOp

    op = TransferOp.READ if cfg.mode == "read" else TransferOp.WRITE
    segments = _segments(cfg)
    # A GPU batch takes ~1-2 ms: a 20 us sleep oversleeps by ~50 us on Linux, a few % of the
    # time measured, so GPU runs only yield. On CPU the tcp transport's Python threads need
    # the core more than the poll needs precision.
    pause_s = 20e-6 if cfg.device == "cpu" else 0.0
    times: list[float] = []
    posts: list[float] = []
    for i in range(cfg.warmup + cfg.iters):
        start = time.perf_counter()
        handle = transport.post(op, "bench-target", segments)
        posted = time.perf_counter()
        _wait(transport, handle, pause_s)
        if cfg.device != "cpu":
            torch.cuda.synchronize()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - start)
            posts.append(posted - start)
    return times, posts


def _ceiling_gbps(cfg: BenchConfig) -> tuple[str, float]:
    """Best-of-iters copy of the same bytes: host memcpy, or device-to-device on GPU.

    The host copy runs on one thread: torch's multi-threaded copy stalls at its barrier
    whenever a sibling thread is descheduled, which on a shared 2-core machine made the
    "ceiling" read 30x lower than memcpy.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _ceiling_copy(cfg)
    finally:
        torch.set_num_threads(threads)


def _ceiling_copy(cfg: BenchConfig) -> tuple[str, float]:
    num_bytes = cfg.num_blocks * cfg.block_bytes
    src_dev = _device_for(cfg.device, "target")
    dst_dev = _device_for(cfg.device, "initiator")
    src = torch.ones(num_bytes, dtype=torch.uint8, device=src_dev)
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=dst_dev)
    dst.copy_(src)  # untimed: first-touch page faults are not the copy's speed
    best = float("inf")
    for _ in range(max(20, cfg.iters)):
        if cfg.device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if cfg.device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    what = "host memcpy" if cfg.device == "cpu" else f"device copy {src_dev}->{dst_dev}"
    return what, num_bytes / best / 1e9


def _verify_read(region: torch.Tensor, cfg: BenchConfig) -> bool:
    """Initiator side of a READ run: local blocks hold the target's pattern bytes."""
    expected = _pattern(2 * cfg.num_blocks * cfg.block_bytes, str(region.device))
    for i in range(cfg.num_blocks):
        src = _remote_slot(i, cfg.layout) * cfg.block_bytes
        got = region[i * cfg.block_bytes:(i + 1) * cfg.block_bytes]
        if not torch.equal(got, expected[src:src + cfg.block_bytes]):
            return False
    return True


def run_config(cfg: BenchConfig) -> dict[str, Any]:
    """Measure one configuration with a fresh target process; returns the JSON row."""
    from connectors.transports import make_transport

    # The ceiling first, while this process runs no transport threads (NIXL's progress thread
    # spins) and the target does not exist yet.
    ceiling = _ceiling_gbps(cfg)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_target_main, args=(child, cfg), daemon=True)
    proc.start()
    transport = None
    try:
        device = _device_for(cfg.device, "initiator")
        nbytes = cfg.num_blocks * cfg.block_bytes
        region = _pattern(nbytes, device) if cfg.mode == "write" else \
            torch.zeros(nbytes, dtype=torch.uint8, device=device)
        transport = make_transport(cfg.transport, agent_name="bench-initiator", **cfg.options)
        transport.register_region(region)
        parent.send_bytes(transport.descriptor())
        transport.add_peer("bench-target", _recv_bytes(parent, proc))
        if not parent.poll(_PIPE_TIMEOUT_S) or parent.recv() != "ready":
            raise BenchError("the target process did not get ready")
        times, posts = _timed_runs(transport, cfg)
        if cfg.mode == "read":
            verified = _verify_read(region, cfg)
        else:
            parent.send("verify")
            verified = bool(parent.poll(_PIPE_TIMEOUT_S) and parent.recv())
        parent.send("stop")
    finally:
        if transport is not None:
            transport.close()
        _reap(proc)
    return _row(cfg, times, posts, verified, ceiling)


def _recv_bytes(parent: Connection, proc: Any) -> bytes:
    if not parent.poll(_PIPE_TIMEOUT_S):
        raise BenchError(f"the target process sent no descriptor (exit code {proc.exitcode})")
    return parent.recv_bytes()


def _reap(proc: Any) -> None:
    """Join the target, escalating to terminate/kill so no process outlives the bench."""
    proc.join(10)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def _row(cfg: BenchConfig, times: list[float], posts: list[float], verified: bool,
         ceiling_measured: tuple[str, float]) -> dict[str, Any]:
    """The JSON row: commit, hardware, versions, config, GB/s and ratio to the ceiling."""
    nbytes = cfg.num_blocks * cfg.block_bytes
    ordered = sorted(times)
    p50 = statistics.median(ordered)
    ceiling_what, ceiling = ceiling_measured
    gbps = nbytes / p50 / 1e9
    return {
        "bench": "transfer",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "hardware": _hardware(cfg.device),
        "versions": _versions(),
        "config": asdict(cfg),
        "total_bytes": nbytes,
        "seconds": {"p50": p50, "p90": _quantile(ordered, 0.9), "p99": _quantile(ordered, 0.99),
                    "min": ordered[0], "post_p50": statistics.median(posts)},
        "gb_per_s": round(gbps, 4),
        "gb_per_s_best": round(nbytes / ordered[0] / 1e9, 4),
        "ceiling": {"what": ceiling_what, "gb_per_s": round(ceiling, 4)},
        "ratio_to_ceiling": round(gbps / ceiling, 5),
        "verified": verified,
        "env": {k: v for k, v in sorted(os.environ.items())
                if k == "DISAGG_KERNEL_CONFIG" or k.startswith(("NIXL_", "UCX_"))},
    }


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _commit() -> str:
    """HEAD's hash (+ ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=_REPO_ROOT, check=True,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def _hardware(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if device != "cpu" else None
    return {"cpu": cpu, "num_cpus": os.cpu_count(), "gpu": gpu,
            "num_gpus": torch.cuda.device_count() if device != "cpu" else 0}


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {"python": platform.python_version(),
                                    "torch": torch.__version__}
    for name in ("msgspec", "nixl", "mori"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` where value is JSON when it parses (numbers, true/false), else text."""
    if "=" not in text:
        raise BenchError(f"--option expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``disagg bench transfer``."""
    from bench.argparsing import DefaultsHelpFormatter  # the repo is on sys.path only by then

    p = argparse.ArgumentParser(prog="disagg bench transfer", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--transport", choices=["tcp", "nixl", "ipc", "mori"], default="tcp",
                   help="KV transport to measure")
    p.add_argument("--mode", choices=["read", "write"], default="read",
                   help="read: the receiver pulls; write: the sender pushes")
    p.add_argument("--num-blocks", type=int, nargs="+", default=[256],
                   help="blocks per transfer (several: one row each)")
    p.add_argument("--block-bytes", type=int, nargs="+", default=[256 * 1024],
                   help="bytes per block (several: one row each)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both sides' KV tensors live")
    p.add_argument("--layout", choices=["strided", "contiguous"], default="strided",
                   help="strided: scattered blocks; contiguous: one run")
    p.add_argument("--iters", type=int, default=5, help="timed transfers per row")
    p.add_argument("--warmup", type=int, default=1, help="untimed transfers first")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="transport option for both sides, e.g. max_connections_per_peer=2 "
                        "(default: none)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help="JSON-lines file each row is appended to")
    return p


def _configs(args: argparse.Namespace) -> list[BenchConfig]:
    options = dict(_parse_option(o) for o in args.option)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but torch sees no GPU")
    if min(args.num_blocks) < 1 or min(args.block_bytes) < 1 or args.iters < 1:
        raise BenchError("--num-blocks, --block-bytes and --iters must be positive")
    return [BenchConfig(args.transport, args.mode, n, b, args.device, args.layout, args.iters,
                        args.warmup, options)
            for n in args.num_blocks for b in args.block_bytes]


def main(argv: list[str] | None = None) -> int:
    """Run every (num_blocks, block_bytes) combination; append one row each. Exit code."""
    args = build_parser().parse_args(argv)
    try:
        from connectors.transports import available_transports

        reason = available_transports().get(args.transport)
        if reason is not None and not (args.transport == "mori" and any(
                o.startswith("api_module=") for o in args.option)):
            raise BenchError(f"transport {args.transport!r} is not usable here: {reason}")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        for cfg in _configs(args):
            row = run_config(cfg)
            with args.output.open("a") as out:
                out.write(json.dumps(row) + "\n")
            print(f"{cfg.transport} {cfg.mode} {cfg.num_blocks} x {cfg.block_bytes} B on "
                  f"{cfg.device}: {row['gb_per_s']:.3f} GB/s "
                  f"({row['ratio_to_ceiling']:.1%} of {row['ceiling']['what']} "
                  f"{row['ceiling']['gb_per_s']:.2f} GB/s), verified={row['verified']}")
            if not row["verified"]:
                return 1
    except BenchError as exc:
        print(f"bench transfer: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(_REPO_ROOT))
    raise SystemExit(main())
