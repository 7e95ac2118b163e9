"""Where a decode step's time goes on a GPU: host, graph replay, and every kernel.

    python -m bench.decode_profile [--shape llama3-8b] [--context 1024] [--batch 1]
                                   [--output FILE] [--commit SHA]

Measures, for ``--batch`` sequences at ``--context`` tokens on the Llama-3-8B-shaped dummy model:
    step_ms     median ``engine.step()`` wall time (what bench.engine_bench reports)
    replay_ms   the decode graph replayed back to back, timed with CUDA events (GPU only)
    kernels     torch.profiler's CUDA kernels inside one step: name, calls, total us
    gemv        each projection's [1, K] x [K, N] matmul alone, in GB/s of weight read
and appends one JSON row to ``bench/results/decode_profile.jsonl`` (or --output).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.engine_bench import SHAPES, _ceilings, _make_llm, _model_dir
from bench.metadata import run_metadata
from bench.results import append_row


def _start_decode(llm: Any, context: int, steps: int, batch: int = 1) -> None:
    from disagg.common.protocol import EngineCoreRequest
    from disagg.common.sampling_params import SamplingParams

    eng = llm.engine
    for i in range(batch):
        eng.add_request(EngineCoreRequest(
            request_id=f"profile-{i}",
            prompt_token_ids=[(j * 7 + i) % 30000 + 10 for j in range(context)],
            sampling_params=SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)))
    while any(r.num_computed_tokens < r.num_prompt_tokens
              for r in eng.scheduler.requests.values()):
        eng.step()  # the prefills (chunked)
    for _ in range(4):  # a few decode steps so the graph is captured
        eng.step()


def _step_ms(llm: Any, steps: int) -> float:
    """Mean of ``steps`` steps back to back (async scheduling overlaps each step's host work
    with the step before it on the device: a sync per step would hide that)."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / steps


def _replay_ms(llm: Any, context: int, batch: int = 1, reps: int = 50) -> float:
    import torch

    runner = llm.engine.runner
    graph = runner.graphs.graph_for(batch, -(-context // runner.block_size) + 1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _host_profile(llm: Any, steps: int = 20) -> list[str]:
    """cProfile of ``steps`` engine steps: the top functions by own time, as text lines."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        llm.engine.step()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    return [line for line in text.getvalue().splitlines() if line.strip()][-16:]


def _kernels(llm: Any, steps: int = 5) -> tuple[list[dict[str, Any]], float]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            llm.engine.step()
        torch.cuda.synchronize()
    rows = []
    total = 0.0
    for evt in prof.key_averages():
        dev_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type.name != "CUDA" or not dev_us:
            continue
        rows.append({"name": evt.key[:90], "calls_per_step": evt.count / steps,
                     "us_per_step": dev_us / steps})
        total += dev_us / steps
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:25], total


def _gemv(hidden: int, shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """GB/s of weight bytes for x[1, K] @ W[N, K]^T, per projection shape."""
    import torch

    out = {}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            torch.nn.functional.linear(x, w)
        end.record()
        end.synchronize()
        out[name] = w.numel() * 2 / (start.elapsed_time(end) / 50 / 1000) / 1e9
        del w, x
    return out


def main(argv: list[str] | None = None) -> int:
    """Profile one decode configuration and append a row."""
    ap = argparse.ArgumentParser(prog="python -m bench.decode_profile")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    ap.add_argument("--commit", default=None,
                    help="commit to record when this copy is not a git checkout")
    ap.add_argument("--output", type=Path, default=Path("bench/results/decode_profile.jsonl"))
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("decode_profile: needs a GPU (CUDA or ROCm); none is visible", file=sys.stderr)
        return 2
    ceil = _ceilings()
    shape = SHAPES[args.shape]
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    gemv = _gemv(h, {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * inter, h),
                     "down": (h, inter), "lm_head": (shape["vocab_size"], h)})
    llm = _make_llm(_model_dir(args.shape))
    _start_decode(llm, args.context, 2 * args.steps + 80, args.batch)
    step = _step_ms(llm, args.steps)
    replay = _replay_ms(llm, args.context, args.batch)
    kernels, kernel_us = _kernels(llm)
    host = _host_profile(llm)
    meta = run_metadata("in-process engine, 1 GPU", None)
    row = {"kind": "decode_profile", "shape": args.shape, "context": args.context,
           "batch": args.batch, "model": f"{args.shape} shape, dummy bf16",
           "workload": f"batch-{args.batch} decode step at context {args.context}: host, "
                       "graph, kernels",
           "command": f"python -m bench.decode_profile --batch {args.batch}",
           "figures": {"step": f"{step:.2f} ms", "graph replay": f"{replay:.2f} ms",
                       "kernels": f"{kernel_us / 1000:.2f} ms/step"},
           "ceilings": ceil, "step_ms": step, "replay_ms": replay,
           "kernel_ms_per_step": kernel_us / 1000, "gemv_gbps": gemv, "top_kernels": kernels,
           "host_profile": host,
           "date": meta["date"], "commit": args.commit or meta["commit"],
           "hardware": meta["hardware"],
           "versions": meta["versions"]}
    print(f"step {step:.3f} ms, graph replay {replay:.3f} ms, kernels {kernel_us / 1000:.3f} "
          f"ms/step; gemv GB/s {({k: round(v) for k, v in gemv.items()})}")
    for k in kernels:
        print(f"  {k['us_per_step']:9.1f} us  x{k['calls_per_step']:6.1f}  {k['name']}")
    print("\n".join(host))
    append_row(args.output, row)
    llm.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
