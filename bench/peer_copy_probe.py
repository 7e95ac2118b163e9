"""Peer-copy primitives on a 2-GPU host: what each way of moving scattered KV blocks between two
GPUs costs, measured in one process (the same NVLink / xGMI path the ipc transport's IPC
mappings use), so the transports can pick the fastest one.

Moves ``--num-blocks`` blocks of ``--block-bytes`` from every other slot of a source region on
GPU 0 to every other slot of a destination region on GPU 1 (the transfer bench's scattered
layout), by:

- ``ce_contiguous``: one copy of the same bytes, contiguous (the ceiling the transfer bench uses);
- ``ce_runs``: one runtime memcpy per block, round-robin over S streams of the source (push) or
  destination (pull) GPU;
- ``ce_batch``: ``cuMemcpyBatchAsync`` (CUDA >= 12.8) of every block, split over S streams;
- ``sm``: the ``copy_segments`` Triton kernel on the source (push) or destination (pull) GPU, for
  several launch configs;
- ``hybrid``: the kernel on a share of the blocks while copy engines move the rest.

One row per (method, variant) in ``--output`` with p50/best GB/s and the ratio to ce_contiguous.
Needs two GPUs with peer access; it refuses to run otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

_REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = _REPO_ROOT / "bench" / "results" / "peer_copy.jsonl"
Runs = list[tuple[int, int, int]]


def _time(fn: Callable[[], object], devices: tuple[int, ...], iters: int) -> list[float]:
    """Seconds per call, host-timed across both devices (each call fully drained)."""
    for d in devices:
        torch.cuda.synchronize(d)
    fn()  # warm-up (compiles, first-touch)
    for d in devices:
        torch.cuda.synchronize(d)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        for d in devices:
            torch.cuda.synchronize(d)
        times.append(time.perf_counter() - start)
    return times


def summary_row(rows: list[dict[str, Any]], num_blocks: int, block_bytes: int,
                stamp: str) -> dict[str, Any]:
    """One results row per run (bench/readme_table's contract): the best variant of each
    method as its figures, every variant under ``variants``."""
    ceiling = next(r["gb_per_s"] for r in rows if r["method"] == "ce_contiguous")
    figures: dict[str, str] = {"contiguous copy": f"{ceiling} GB/s"}
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "ce_contiguous"):
        best = max((r for r in rows if r["method"] == method), key=lambda r: r["gb_per_s"])
        figures[f"best {method}"] = (f"{best['gb_per_s']} GB/s = {best['gb_per_s'] / ceiling:.0%}"
                                     f" ({json.dumps(best['variant'])})")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "?"
    return {"kind": "peer_copy", "date": stamp,
            "hardware": {"summary": f"{torch.cuda.device_count()}x {gpu}"}, "model": "-",
            "workload": f"{num_blocks} x {block_bytes >> 20} MiB scattered blocks GPU 0 -> 1, "
                        "one process, p50 of each way",
            "command": "python bench/peer_copy_probe.py", "figures": figures,
            "torch": torch.__version__, "variants": rows}


class _Probe:
    """The two regions, their streams and the copy primitives; ``record`` times one variant."""

    def __init__(self, num_blocks: int, block_bytes: int, iters: int, only: set[str]) -> None:
        sys.path.insert(0, str(_REPO_ROOT))
        from connectors.transports.gpu_runtime import (
            BatchMemcpy,
            RuntimeMemcpy,
            enable_peer_access,
        )
        from hip_kernels.kv_blocks import _copy_segments_kernel, chunk_table

        self._kernel, self._chunk_table = _copy_segments_kernel, chunk_table
        n, bb = num_blocks, block_bytes
        self.src = torch.full((2 * n * bb,), 7, dtype=torch.uint8, device="cuda:0")
        self.dst = torch.zeros((2 * n * bb,), dtype=torch.uint8, device="cuda:1")
        enable_peer_access(self.src.device, self.dst.device)
        self.runs: Runs = [(2 * i * bb, (2 * i + 1) * bb, bb) for i in range(n)]
        self.nbytes = n * bb
        self.iters, self.only = iters, only
        self.memcpy = RuntimeMemcpy()
        self.batch: Any = None
        try:
            self.batch = BatchMemcpy()
        except Exception as exc:  # noqa: BLE001 - report and skip the method
            print(f"ce_batch unavailable: {exc}")
        self.streams = {d: [torch.cuda.Stream(torch.device("cuda", d)) for _ in range(8)]
                        for d in (0, 1)}
        self.rows: list[dict[str, Any]] = []

    def record(self, method: str, variant: dict[str, Any], fn: Callable[[], object]) -> None:
        """Time ``fn`` (all-7 bytes into a zeroed destination), check the copied blocks' edges
        and keep one row; a variant that raises is printed, not recorded."""
        if self.only and method not in self.only and method != "ce_contiguous":
            return
        self.dst.zero_()
        try:
            times = _time(fn, (0, 1), self.iters)
        except Exception as exc:  # noqa: BLE001 - a failing variant is a row, not a crash
            print(f"{method} {variant}: failed: {type(exc).__name__}: {exc}")
            return
        dst = self.dst
        ok = all(bool((dst[d:d + 64] == 7).all()) and bool((dst[d + k - 64:d + k] == 7).all())
                 for _, d, k in self.runs) if method != "ce_contiguous" else True
        p50 = statistics.median(times)
        row = {"method": method, "variant": variant, "p50_s": p50, "best_s": min(times),
               "gb_per_s": round(self.nbytes / p50 / 1e9, 2),
               "gb_per_s_best": round(self.nbytes / min(times) / 1e9, 2), "verified": ok}
        self.rows.append(row)
        print(f"{method:14s} {json.dumps(variant):60s} {row['gb_per_s']:8.1f} GB/s "
              f"(best {row['gb_per_s_best']:.1f}) ok={ok}", flush=True)

    def contiguous(self) -> None:
        self.dst[: self.nbytes].copy_(self.src[: self.nbytes])

    def ce_runs(self, rs: Runs, dev: int, s: int) -> None:
        """One runtime memcpy per run, round-robin over ``s`` streams of GPU ``dev``."""
        with torch.cuda.device(dev):
            for i, (a, b, k) in enumerate(rs):
                self.memcpy.copy(self.dst.data_ptr() + b, self.src.data_ptr() + a, k,
                                 self.streams[dev][i % s].cuda_stream)

    def ce_batch(self, rs: Runs, dev: int, s: int) -> None:
        """One ``cuMemcpyBatchAsync`` per stream, each taking every s-th run."""
        with torch.cuda.device(dev):
            for j in range(s):
                arr = np.array(rs[j::s], dtype=np.int64).reshape(-1, 3)
                self.batch.copy(arr[:, 1] + self.dst.data_ptr(), arr[:, 0] + self.src.data_ptr(),
                                arr[:, 2], self.streams[dev][j].cuda_stream,
                                src_device=0, dst_device=1)

    def sm(self, rs: Runs, dev: int, block: int, chunk: int, warps: int) -> None:
        """The ``copy_segments`` Triton kernel on GPU ``dev``."""
        table = torch.from_numpy(self._chunk_table(rs, 4, chunk)).to(f"cuda:{dev}")
        with torch.cuda.device(dev):
            self._kernel[(table.shape[1],)](
                self.src.view(torch.int32), self.dst.view(torch.int32), table, table.shape[1],
                BLOCK=block, CHUNK=chunk, num_warps=warps)

    def hybrid(self, share: float, dev: int, s: int, cfg: tuple[int, int, int]) -> None:
        """The kernel on the last ``share`` of the runs, copy engines on the rest."""
        cut = int(len(self.runs) * share)
        self.ce_runs(self.runs[:len(self.runs) - cut], dev, s)
        self.sm(self.runs[len(self.runs) - cut:], dev, *cfg)


SIDES = ((0, "push"), (1, "pull"))
SM_CONFIGS = [(4096, 32768, 8), (4096, 4096, 4), (8192, 8192, 8), (16384, 16384, 16),
              (2048, 2048, 4), (4096, 131072, 8), (16384, 65536, 16), (1024, 1024, 2)]
"""(BLOCK words per step, CHUNK words per program, num_warps) of the kernel variants."""


def sweep(probe: _Probe) -> None:
    """Every method and variant, in the order of the module docstring."""
    probe.record("ce_contiguous", {}, probe.contiguous)
    runs = probe.runs
    for dev, where in SIDES:
        for s in (1, 2, 4, 8):
            probe.record("ce_runs", {"side": where, "streams": s},
                         partial(probe.ce_runs, runs, dev, s))
    if probe.batch is not None:
        for dev, where in SIDES:
            for s in (1, 2, 4, 8):
                probe.record("ce_batch", {"side": where, "streams": s},
                             partial(probe.ce_batch, runs, dev, s))
    for dev, where in SIDES:
        for block, chunk, warps in SM_CONFIGS:
            probe.record("sm", {"side": where, "block": block, "chunk": chunk, "warps": warps},
                         partial(probe.sm, runs, dev, block, chunk, warps))
    for share in (0.5, 0.6, 0.7, 0.8):
        for dev, where in SIDES:
            probe.record("hybrid", {"side": where, "sm_share": share, "streams": 4},
                         partial(probe.hybrid, share, dev, 4, SM_CONFIGS[0]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-blocks", type=int, default=256)
    p.add_argument("--block-bytes", type=int, default=2 << 20)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--only", default="", help="comma-separated methods to run (default all)")
    args = p.parse_args(argv)
    if torch.cuda.device_count() < 2 or not torch.cuda.can_device_access_peer(0, 1):
        print("peer_copy_probe: needs two GPUs with peer access", file=sys.stderr)
        return 2
    probe = _Probe(args.num_blocks, args.block_bytes, args.iters,
                   {m for m in args.only.split(",") if m})
    sweep(probe)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as out:
        out.write(json.dumps(summary_row(probe.rows, args.num_blocks, args.block_bytes, stamp))
                  + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
