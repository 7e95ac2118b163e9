"""``disagg bench serve``: benchmark any OpenAI-compatible streaming endpoint.

Per point: one probe request (first point only), untimed warm-ups, the timed run on the arrival
schedule, vLLM-compatible metrics, a summary table, the full JSON (``--save-result`` or any
sweep), and one summary row appended to ``bench/results/serve.jsonl``. Sweeps also get plots.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.argparsing import UsageError, run_cli
from bench.client import RequestInput, RequestOutput, send_request
from bench.datasets import SampleRequest, sample_requests
from bench.load import LoadConfig, RunOutcome, make_session, run_batch, run_load
from bench.metadata import run_metadata
from bench.metrics import (
    calculate_metrics,
    finite_or_str,
    max_concurrent_requests,
    max_output_tokens_per_s,
)
from bench.results import append_row, format_summary, rate_label, summary_row, write_json
from bench.serve_args import Point, ServePlan, dataset_config, parse, workload_label
from disagg.common.tokenizer import get_tokenizer

PROG = "disagg bench serve"
_PROBE_OUTPUT_TOKENS = 4


class BenchmarkError(RuntimeError):
    """The benchmark could not run (endpoint unreachable, probe failed)."""


def _inputs(args: argparse.Namespace, plan: ServePlan,
            samples: list[SampleRequest]) -> list[RequestInput]:
    """Request inputs for samples, sharing the target and extra body."""
    api_url = args.base_url.rstrip("/") + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    model = args.served_model_name or args.model
    return [RequestInput(api_url=api_url, model=model, prompt=s.prompt, prompt_len=s.prompt_len,
                         output_len=s.expected_output_len, extra_body=plan.extra_body,
                         headers=headers) for s in samples]


async def _probe(args: argparse.Namespace, plan: ServePlan, sample: SampleRequest) -> None:
    """One short request before anything else: fail fast with the server's own error."""
    short = SampleRequest(sample.prompt, sample.prompt_len,
                          min(_PROBE_OUTPUT_TOKENS, sample.expected_output_len))
    async with make_session(1) as session:
        out = await send_request(session, _inputs(args, plan, [short])[0], args.request_timeout_s)
    if not out.success:
        raise BenchmarkError(f"the test request to {args.base_url}{args.endpoint} failed: "
                             f"{out.error}")


async def _run_point(args: argparse.Namespace, plan: ServePlan, point: Point,
                     measured: list[RequestInput], warmups: list[RequestInput]) -> RunOutcome:
    """Warm up, then run one timed point in its own session sized to the point's concurrency."""
    load = LoadConfig(request_rate=point.request_rate, burstiness=args.burstiness,
                      max_concurrency=point.max_concurrency, seed=args.seed,
                      request_timeout_s=args.request_timeout_s,
                      show_progress=not args.disable_tqdm)
    async with make_session(point.max_concurrency) as session:
        if warmups:
            await run_batch(session, warmups, point.max_concurrency, args.request_timeout_s)
        return await run_load(session, measured, load)


def _client_figures(outcome: RunOutcome, completed: int) -> dict[str, Any]:
    """How hard the client itself worked: CPU per request and event-loop lag."""
    lags = np.asarray(outcome.loop_lag_ms or [0.0])
    return {
        "client_cpu_s": outcome.client_cpu_s,
        "client_cpu_ms_per_request": outcome.client_cpu_s * 1000 / max(completed, 1),
        "client_cpu_utilization": outcome.client_cpu_s / max(outcome.duration_s, 1e-9),
        "client_loop_lag_p99_ms": float(np.percentile(lags, 99)),
        "client_loop_lag_max_ms": float(lags.max()),
    }


def build_result(args: argparse.Namespace, plan: ServePlan, point: Point,
                 outcome: RunOutcome, argv: list[str]) -> dict[str, Any]:
    """The full result: vLLM's keys first, then our metadata and client figures."""
    outputs: list[RequestOutput] = outcome.outputs
    metrics = calculate_metrics(outputs, outcome.duration_s, plan.percentile_metrics,
                                plan.percentiles, plan.goodput_slos_ms)
    meta = run_metadata(args.deployment, args.hardware)
    result: dict[str, Any] = {
        "kind": "serve", "date": meta["date"], "endpoint_type": "openai",
        "label": args.label, "model_id": args.model,
        "tokenizer_id": args.tokenizer or args.model, "num_prompts": point.num_prompts,
        "request_rate": finite_or_str(point.request_rate), "burstiness": args.burstiness,
        "max_concurrency": point.max_concurrency, "base_url": args.base_url,
        "endpoint": args.endpoint, "dataset_name": args.dataset_name,
        "workload": workload_label(dataset_config(args, point.num_prompts)),
        "num_warmups": args.num_warmups, "seed": args.seed,
        "goodput_slos_ms": plan.goodput_slos_ms,
        "command": f"{PROG} {shlex.join(argv)}", "deployment": args.deployment,
        "commit": meta["commit"], "hardware": meta["hardware"], "versions": meta["versions"],
    }
    result.update(metrics)
    result["max_concurrent_requests"] = max_concurrent_requests(outputs)
    result["max_output_tokens_per_s"] = max_output_tokens_per_s(outputs, outcome.bench_start_s)
    result.update(_client_figures(outcome, metrics["completed"]))
    return result


def result_path(args: argparse.Namespace, result: dict[str, Any], sweep_axis: str | None) -> Path:
    """``--result-dir/--result-filename``, with ``-c<N>``/``-r<R>`` per sweep point."""
    point_tag = ""
    if sweep_axis == "concurrency":
        point_tag = f"-c{result['max_concurrency']}"
    elif sweep_axis == "rate":
        rate = result["request_rate"]
        point_tag = f"-r{rate if isinstance(rate, str) else rate_label(rate)}"
    if args.result_filename:
        stem, ext = os.path.splitext(args.result_filename)
        name = f"{stem}{point_tag}{ext or '.json'}"
    else:
        model = Path(args.model.rstrip("/")).name.replace(":", "-")
        rate = result["request_rate"]
        name = (f"serve-{rate}qps-c{result['max_concurrency']}-{model}-{result['date']}"
                f"{point_tag}.json")
    return Path(args.result_dir) / name


def _emit(args: argparse.Namespace, plan: ServePlan, result: dict[str, Any]) -> None:
    """Print the summary and write the JSON and the summary row."""
    print(format_summary(result, plan.percentile_metrics), flush=True)
    if args.save_result or plan.sweep_axis:
        path = write_json(result_path(args, result, plan.sweep_axis), result)
        print(f"result written to {path}", flush=True)
    if args.results_jsonl:
        append_row(Path(args.results_jsonl), summary_row(result))


async def _run_all(args: argparse.Namespace, plan: ServePlan, samples: list[SampleRequest],
                   argv: list[str]) -> list[dict[str, Any]]:
    """Every point of the run, in order."""
    warmups = _inputs(args, plan, samples[len(samples) - args.num_warmups:]) \
        if args.num_warmups else []
    await _probe(args, plan, samples[0])
    results = []
    for point in plan.points:
        if plan.sweep_axis:
            print(f"--- point: max_concurrency={point.max_concurrency} "
                  f"request_rate={rate_label(point.request_rate)}", flush=True)
        measured = _inputs(args, plan, samples[:point.num_prompts])
        outcome = await _run_point(args, plan, point, measured, warmups)
        result = build_result(args, plan, point, outcome, argv)
        _emit(args, plan, result)
        results.append(result)
    return results


def _plot(args: argparse.Namespace, sweep_axis: str, results: list[dict[str, Any]]) -> None:
    """Sweep plots next to the result JSON files; a missing matplotlib is one warning."""
    try:
        from bench.plots import plot_sweep
    except ImportError:
        print("warning: matplotlib is not installed; no plots", file=sys.stderr)
        return
    stem = Path(args.result_filename).stem if args.result_filename else "serve-sweep"
    for path in plot_sweep(results, sweep_axis, Path(args.result_dir) / stem):
        print(f"plot written to {path}", flush=True)


def run(argv: list[str]) -> int:
    """Parse, build the workload, run every point; raises UsageError for user errors."""
    args, plan = parse(argv)
    tokenizer = get_tokenizer(args.tokenizer or args.model)
    num_samples = max(p.num_prompts for p in plan.points) + args.num_warmups
    try:
        samples = sample_requests(dataset_config(args, num_samples), tokenizer)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        results = asyncio.run(_run_all(args, plan, samples, argv))
    except BenchmarkError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    if plan.sweep_axis:
        _plot(args, plan.sweep_axis, results)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``disagg bench serve``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: run(argv))
