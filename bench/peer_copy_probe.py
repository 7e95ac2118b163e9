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
    sys.path.insert(0, str(_REPO_ROOT))
    from connectors.transports.gpu_runtime import BatchMemcpy, RuntimeMemcpy, enable_peer_access
    from hip_kernels.kv_blocks import _copy_segments_kernel, chunk_table

    n, bb = args.num_blocks, args.block_bytes
    src = torch.full((2 * n * bb,), 7, dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros((2 * n * bb,), dtype=torch.uint8, device="cuda:1")
    enable_peer_access(src.device, dst.device)
    runs: Runs = [(2 * i * bb, (2 * i + 1) * bb, bb) for i in range(n)]
    nbytes = n * bb
    memcpy = RuntimeMemcpy()
    try:
        batch: BatchMemcpy | None = BatchMemcpy()
    except Exception as exc:  # noqa: BLE001 - report and skip the method
        print(f"ce_batch unavailable: {exc}")
        batch = None
    streams = {d: [torch.cuda.Stream(torch.device("cuda", d)) for _ in range(8)] for d in (0, 1)}
    only = {m for m in args.only.split(",") if m}
    rows: list[dict[str, Any]] = []

    def record(method: str, variant: dict[str, Any], fn: Callable[[], object]) -> None:
        if only and method not in only and method != "ce_contiguous":
            return
        dst.zero_()
        try:
            times = _time(fn, (0, 1), args.iters)
        except Exception as exc:  # noqa: BLE001 - a failing variant is a row, not a crash
            print(f"{method} {variant}: failed: {type(exc).__name__}: {exc}")
            return
        ok = all(bool((dst[d:d + 64] == 7).all()) and bool((dst[d + k - 64:d + k] == 7).all())
                 for _, d, k in runs) if method != "ce_contiguous" else True
        p50 = statistics.median(times)
        row = {"method": method, "variant": variant, "p50_s": p50, "best_s": min(times),
               "gb_per_s": round(nbytes / p50 / 1e9, 2),
               "gb_per_s_best": round(nbytes / min(times) / 1e9, 2), "verified": ok}
        rows.append(row)
        print(f"{method:14s} {json.dumps(variant):60s} {row['gb_per_s']:8.1f} GB/s "
              f"(best {row['gb_per_s_best']:.1f}) ok={ok}", flush=True)

    flat_src, flat_dst = src[: nbytes], dst[: nbytes]
    record("ce_contiguous", {}, lambda: flat_dst.copy_(flat_src))

    def ce_runs(rs: Runs, dev: int, s: int) -> None:
        with torch.cuda.device(dev):
            for i, (a, b, k) in enumerate(rs):
                memcpy.copy(dst.data_ptr() + b, src.data_ptr() + a, k,
                            streams[dev][i % s].cuda_stream)

    for dev, where in ((0, "push"), (1, "pull")):
        for s in (1, 2, 4, 8):
            record("ce_runs", {"side": where, "streams": s},
                   partial(ce_runs, runs, dev, s))

    def ce_batch(rs: Runs, dev: int, s: int) -> None:
        assert batch is not None
        with torch.cuda.device(dev):
            for j in range(s):
                part = rs[j::s]
                arr = np.array(part, dtype=np.int64).reshape(-1, 3)
                batch.copy(arr[:, 1] + dst.data_ptr(), arr[:, 0] + src.data_ptr(), arr[:, 2],
                           streams[dev][j].cuda_stream,
                           src_device=0, dst_device=1)

    if batch is not None:
        for dev, where in ((0, "push"), (1, "pull")):
            for s in (1, 2, 4, 8):
                record("ce_batch", {"side": where, "streams": s},
                       partial(ce_batch, runs, dev, s))

    def sm(rs: Runs, dev: int, block: int, chunk: int, warps: int) -> None:
        table = torch.from_numpy(chunk_table(rs, 4, chunk)).to(f"cuda:{dev}")
        with torch.cuda.device(dev):
            _copy_segments_kernel[(table.shape[1],)](
                src.view(torch.int32), dst.view(torch.int32), table, table.shape[1],
                BLOCK=block, CHUNK=chunk, num_warps=warps)

    configs = [(4096, 32768, 8), (4096, 4096, 4), (8192, 8192, 8), (16384, 16384, 16),
               (2048, 2048, 4), (4096, 131072, 8), (16384, 65536, 16), (1024, 1024, 2)]
    for dev, where in ((0, "push"), (1, "pull")):
        for block, chunk, warps in configs:
            record("sm", {"side": where, "block": block, "chunk": chunk, "warps": warps},
                   partial(sm, runs, dev, block, chunk, warps))

    def hybrid(share: float, dev: int, s: int, cfg: tuple[int, int, int]) -> None:
        cut = int(len(runs) * share)
        ce_part, sm_part = runs[:len(runs) - cut], runs[len(runs) - cut:]
        ce_runs(ce_part, dev, s)
        sm(sm_part, dev, *cfg)

    for share in (0.5, 0.6, 0.7, 0.8):
        for dev, where in ((0, "push"), (1, "pull")):
            record("hybrid", {"side": where, "sm_share": share, "streams": 4},
                   partial(hybrid, share, dev, 4, (4096, 32768, 8)))

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a") as out:
        out.write(json.dumps(summary_row(rows, n, bb, stamp)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
