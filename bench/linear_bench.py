"""The plain linears of a decode step as the step runs them: which library, which tiles.

    python -m bench.linear_bench [--rows 1,2,4,...] [--sweep] [--output F] [--commit C]

Each case is one projection of Llama-3-8B at a token count, timed inside a CUDA/HIP graph that
runs it once per layer over 32 copies of the weight (4 for the LM head): the weights stream
from memory as in a decode step, with no L2 reuse and no launch gaps between calls (a single
eager launch with L2 flushed, as bench/kernel_bench.py times, pays a launch and a cold start
that a replayed step does not). Per token count, three variants:

    cublas    F.linear with torch's default vendor BLAS (cuBLAS / hipBLAS)
    lt        F.linear preferring cuBLASLt / hipBLASLt (hip_kernels/vendor_blas.py)
    skinny    hip_kernels/skinny_gemm.py with this arch's tiles (1..8 rows)

One JSON row per token count goes to bench/results/linears.jsonl: us per call and TB/s of
weight bytes for each projection and variant, and the per-layer sum (what one decoder layer
spends). ``--sweep`` adds one row of skinny tile candidates at one row. These rows are the
evidence behind hip_kernels/configs/<arch>/skinny_gemm.json and vendor_blas.json. Needs a GPU;
on a CPU-only machine it refuses with exit code 2.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.kernel_bench import HEAD_DIM, HIDDEN, INTER, KV_HEADS, Q_HEADS
from bench.metadata import run_metadata
from bench.results import append_row

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "linears.jsonl"
LAYER_COPIES = 32
VOCAB = 128256
PROJECTIONS = {"qkv": ((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
               "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER),
               "lm_head": (VOCAB, HIDDEN)}
LAYER = ("qkv", "o_proj", "gate_up", "down")
DEFAULT_ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256)
SWEEP = {"block_n": (4, 8, 16), "block_k": (256, 512, 1024), "num_warps": (2, 4, 8)}


def graph_us(fn: Callable[[Any, Any], Any], x: Any, weights: list[Any], reps: int = 20) -> float:
    """Device us per call of ``fn(x, w)``, one call per weight copy inside one graph."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (Triton compiles here)
        for w in weights[:2]:
            fn(x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps / len(weights)


def _variants(rows: int) -> dict[str, Callable[[Any, Any], Any]]:
    import torch.nn.functional as F

    from hip_kernels.skinny_gemm import MAX_ROWS, skinny_gemm
    from hip_kernels.vendor_blas import prefer_lt

    def lt(x: Any, w: Any) -> Any:
        with prefer_lt(x.shape[0], ((1, 1 << 30),)):
            return F.linear(x, w)

    out: dict[str, Callable[[Any, Any], Any]] = {"cublas": F.linear, "lt": lt}
    if rows <= MAX_ROWS:
        out["skinny"] = skinny_gemm
    return out


def measure_rows(rows: int, weights: dict[str, list[Any]]) -> dict[str, Any]:
    """One token count: us and TB/s per projection and variant, and the per-layer sums."""
    import torch

    per: dict[str, dict[str, float]] = {}
    for name, ws in weights.items():
        n, k = PROJECTIONS[name]
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        for variant, fn in _variants(rows).items():
            us = graph_us(fn, x, ws)
            per.setdefault(variant, {})[name] = round(us, 2)
            per[variant][f"{name}_tbps"] = round(n * k * 2 / us / 1e6, 3)
    layer = {variant: round(sum(v[p] for p in LAYER), 2) for variant, v in per.items()}
    return {"rows": rows, "us": per, "layer_us": layer}


def sweep_one_row(weights: dict[str, list[Any]]) -> dict[str, Any]:
    """Every candidate skinny tile at one row: us per projection and the per-layer sum."""
    import torch

    from hip_kernels.launch_config import overridden
    from hip_kernels.skinny_gemm import skinny_gemm

    found: list[dict[str, Any]] = []
    for bn, bk, warps in itertools.product(*SWEEP.values()):
        tiles = {"block_n": [[8, bn]], "block_k": [[8, bk]], "num_warps": [[8, warps]]}
        tiles |= {f"{key}_wide": value for key, value in tiles.items()}
        with overridden({"skinny_gemm": tiles}):
            us = {}
            for name, ws in weights.items():
                x = torch.randn(1, PROJECTIONS[name][1], device="cuda", dtype=torch.bfloat16)
                us[name] = round(graph_us(skinny_gemm, x, ws, reps=10), 2)
        found.append({"tile": [bn, bk, warps], "us": us,
                      "layer_us": round(sum(us[p] for p in LAYER), 2)})
    found.sort(key=lambda r: r["layer_us"])
    best = {name: min(found, key=lambda r: r["us"][name]) for name in weights}
    return {"candidates": found, "best_per_projection": {
        name: {"tile": r["tile"], "us": r["us"][name]} for name, r in best.items()}}


def main(argv: list[str] | None = None) -> int:
    """Time every projection at every token count; one row each."""
    ap = argparse.ArgumentParser(prog="python -m bench.linear_bench")
    ap.add_argument("--rows", default=",".join(map(str, DEFAULT_ROWS)),
                    help="comma-separated token counts")
    ap.add_argument("--sweep", action="store_true", help="also sweep skinny tiles at one row")
    ap.add_argument("--commit", default=None,
                    help="commit to record when this copy is not a git checkout")
    ap.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = ap.parse_args(argv)
    try:
        rows_list = [int(r) for r in args.rows.split(",")]
        if not all(0 < r <= 65536 for r in rows_list):
            raise ValueError
    except ValueError:
        print(f"linear_bench: --rows must be positive integers, got {args.rows!r}",
              file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("linear_bench: needs a GPU (CUDA or ROCm); none is visible", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    weights = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
                      for _ in range(4 if name == "lm_head" else LAYER_COPIES)]
               for name, (n, k) in PROJECTIONS.items()}
    meta = run_metadata("in-process, 1 GPU", None)
    base = {"kind": "linears", "model": "Llama-3-8B projections, bf16",
            "command": "python -m bench.linear_bench",
            "date": meta["date"], "commit": args.commit or meta["commit"],
            "hardware": meta["hardware"], "versions": meta["versions"]}
    for rows in rows_list:
        result = measure_rows(rows, weights)
        print(f"rows {rows:5d}: per layer " + ", ".join(
            f"{v} {us:.1f} us" for v, us in result["layer_us"].items()), flush=True)
        append_row(args.output, base | {"workload": f"{rows} tokens"} | result)
    if args.sweep:
        result = sweep_one_row(weights)
        for r in result["candidates"][:5]:
            print(f"tile {r['tile']}: per layer {r['layer_us']} us {r['us']}")
        print(f"best per projection: {result['best_per_projection']}")
        append_row(args.output, base | {"workload": "skinny tile sweep, 1 token"} | result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
