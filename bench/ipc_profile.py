"""Where the time of one ipc ``post`` goes, host and GPU side (diagnostic; needs 2 GPUs).

Runs ``bench.transfer`` configurations of the ipc transport with the copier instrumented:
host timestamps at post entry, at each batched-memcpy call and at post exit, and a timing
event recorded on each copy stream after each call, so the GPU-side completion of every slice
is known relative to a start event recorded when the batch begins. Prints one summary line per
configuration (medians over the timed posts, in microseconds from post entry / start event).

    python -m bench.ipc_profile --mode read --option streams=4
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bench.transfer import BenchConfig, _parse_option, run_config


class _Recorder:
    """Timestamps of the posts of one configuration."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []

    def install(self) -> None:
        from connectors.transports import ipc, ipc_copy
        from connectors.transports.gpu_runtime import BatchMemcpy

        rec = self
        post, issue, copy_rows = (ipc.IpcTransport.post, ipc_copy.PeerCopier.issue,
                                  BatchMemcpy.copy_rows)

        def timed_post(this: Any, *args: Any, **kwargs: Any) -> int:
            entry = {"t0": time.perf_counter(), "calls": [], "events": []}
            rec.posts.append(entry)
            handle = post(this, *args, **kwargs)
            entry["t_exit"] = time.perf_counter()
            return handle

        def timed_issue(this: Any, src: torch.Tensor, dst: torch.Tensor, *args: Any,
                        **kwargs: Any) -> Any:
            entry = rec.posts[-1]
            entry["t_issue"] = time.perf_counter()
            local = src if kwargs.get("src_is_local") else dst
            start = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(local.device))
            entry["start"] = start
            return issue(this, src, dst, *args, **kwargs)

        def timed_copy_rows(this: Any, rows: Any, first: int, stop: int, stream: int) -> None:
            entry = rec.posts[-1]
            before = time.perf_counter()
            copy_rows(this, rows, first, stop, stream)
            after = time.perf_counter()
            done = torch.cuda.Event(enable_timing=True)
            done.record(torch.cuda.ExternalStream(stream))
            entry["calls"].append((stream, stop - first, before, after))
            entry["events"].append((stream, done))

        for name in ("merge_array", "open_batch"):  # the steps of post before issue
            setattr(ipc, name, rec.stamped(getattr(ipc, name), name))
        for name in ("BatchRows", "split_bounds"):  # the steps of issue before the first call
            setattr(ipc_copy, name, rec.stamped(getattr(ipc_copy, name), name))
        ipc.IpcTransport.post = timed_post  # type: ignore[method-assign,assignment]
        ipc_copy.PeerCopier.issue = timed_issue  # type: ignore[method-assign,assignment]
        BatchMemcpy.copy_rows = timed_copy_rows  # type: ignore[method-assign,assignment]

    def stamped(self, fn: Any, name: str) -> Any:
        """``fn`` recording, in the current post, when it returned."""
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            if self.posts:
                self.posts[-1].setdefault("steps", {})[name] = time.perf_counter()
            return result
        return wrapper

    def summary(self, skip: int) -> dict[str, float]:
        """Medians over the posts after the first ``skip`` (warm-up)."""
        torch.cuda.synchronize()
        rows: dict[str, list[float]] = {}

        def add(key: str, seconds: float) -> None:
            rows.setdefault(key, []).append(seconds * 1e6)

        for entry in self.posts[skip:]:
            if not entry["calls"]:
                continue
            t0 = entry["t0"]
            for name, t in entry.get("steps", {}).items():
                add(f"host_{name}_done", t - t0)
            add("host_issue_entry", entry["t_issue"] - t0)
            add("host_first_call_start", entry["calls"][0][2] - t0)
            add("host_first_call_end", entry["calls"][0][3] - t0)
            add("host_last_call_end", entry["calls"][-1][3] - t0)
            add("host_post_exit", entry["t_exit"] - t0)
            add("calls", len(entry["calls"]) / 1e6)
            add("us_per_copy_in_calls",
                sum(c[3] - c[2] for c in entry["calls"]) / sum(c[1] for c in entry["calls"]))
            start = entry["start"]
            done = [start.elapsed_time(event) / 1e3 for _, event in entry["events"]]
            firsts: dict[int, float] = {}
            for (stream, _), t in zip(entry["events"], done):
                firsts.setdefault(stream, t)
            add("gpu_first_slice_done_min", min(firsts.values()))
            add("gpu_first_slice_done_max", max(firsts.values()))
            add("gpu_all_done", max(done))
        return {k: round(statistics.median(v), 2) for k, v in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("read", "write"), default="read")
    p.add_argument("--num-blocks", type=int, default=256)
    p.add_argument("--block-bytes", type=int, default=2 << 20)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--option", action="append", default=[], help="ipc option key=value")
    args = p.parse_args()
    rec = _Recorder()
    rec.install()
    cfg = BenchConfig(transport="ipc", mode=args.mode, num_blocks=args.num_blocks,
                      block_bytes=args.block_bytes, device="cuda", layout="strided",
                      iters=args.iters, warmup=args.warmup,
                      options=dict(_parse_option(o) for o in args.option))
    row = run_config(cfg)
    print(f"ipc {args.mode} {cfg.options}: {row['ratio_to_ceiling']:.1%} p50 "
          f"{row['seconds']['p50'] * 1e6:.0f} us", rec.summary(args.warmup), flush=True)


if __name__ == "__main__":
    main()
