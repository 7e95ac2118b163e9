"""``disagg bench serve``: benchmark any OpenAI-compatible streaming endpoint.

Per point: one probe request (first point only), untimed warm-ups, the timed run on the arrival
schedule, vLLM-compatible metrics, a summary table, the full JSON (``--save-result`` or any
sweep), and with ``--results-jsonl PATH`` one summary row appended there. Sweeps also get plots.
With ``--metrics-url`` (each instance) the point also reports the prefix-cache hit rate and the
KV bytes moved per request (bench/instance_metrics.py).

With ``--compare-colocated URL`` both endpoints are probed, then every point runs against
``--base-url`` (P/D) and afterwards, with the same requests and arrival times, against URL
(colocated); each run's results are written as usual (``-pd``/``-colocated`` in file names),
then the comparison (bench/compare_colocated.py): a table, ``<stem>-compare.json`` and one
``serve-compare`` row per point in ``--results-jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import numpy as np

from bench import instance_metrics
from bench.argparsing import UsageError, run_cli
from bench.client import RequestInput, RequestOutput, send_request
from bench.compare_colocated import (
    compare_point,
    comparison_result,
    comparison_row,
    format_comparison,
    loss_warning,
)
from bench.load import LoadConfig, RequestChain, RunOutcome, make_session, run_batch, run_chains
from bench.metadata import run_metadata
from bench.metrics import (
    calculate_metrics,
    finite_or_str,
    max_concurrent_requests,
    max_output_tokens_per_s,
    pareto_figures,
)
from bench.results import append_row, format_summary, rate_label, summary_row, write_json
from bench.serve_args import (
    Point,
    ServePlan,
    colocated_args,
    dataset_config,
    parse,
    workload_label,
)
from bench.serve_args import build_parser as build_parser  # every subcommand module has one
from bench.serve_workload import Workload, build_workload
from disagg.common.config import ConfigError
from disagg.common.hf_cache import resolve_model
from disagg.common.tokenizer import Tokenizer, get_tokenizer

PROG = "disagg bench serve"


class BenchmarkError(RuntimeError):
    """The benchmark could not run (endpoint unreachable, probe failed)."""


async def _probe(args: argparse.Namespace, probe: RequestInput) -> None:
    """One short request before anything else: fail fast with the server's own error."""
    async with make_session(1) as session:
        out = await send_request(session, probe, args.request_timeout_s)
    if not out.success:
        raise BenchmarkError(f"the test request to {args.base_url}{args.endpoint} failed: "
                             f"{out.error}")


async def _read_counters(urls: list[str]) -> instance_metrics.Snapshot:
    """The instances' counters once they stop moving; BenchmarkError if one cannot be read."""
    async with aiohttp.ClientSession(trust_env=False) as session:
        try:
            return await instance_metrics.scrape_settled(session, urls)
        except instance_metrics.ScrapeError as exc:
            raise BenchmarkError(str(exc)) from None


async def _run_point(args: argparse.Namespace, point: Point, chains: list[RequestChain],
                     warmups: list[RequestInput]
                     ) -> tuple[RunOutcome, instance_metrics.Readings | None]:
    """Warm up, then run one timed point in its own session sized to the point's concurrency;
    with --metrics-url also the counters just before and after the timed part."""
    load = LoadConfig(request_rate=point.request_rate, burstiness=args.burstiness,
                      max_concurrency=point.max_concurrency, seed=args.seed,
                      request_timeout_s=args.request_timeout_s,
                      show_progress=not args.disable_tqdm)
    async with make_session(point.max_concurrency) as session:
        if warmups:
            await run_batch(session, warmups, point.max_concurrency, args.request_timeout_s)
        if not args.metrics_url:
            return await run_chains(session, chains, load), None
        before = await _read_counters(args.metrics_url)
        outcome = await run_chains(session, chains, load)
    after = await _read_counters(args.metrics_url)
    return outcome, instance_metrics.Readings(before, after)


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
                 outcome: RunOutcome, argv: list[str],
                 counters: instance_metrics.Readings | None = None) -> dict[str, Any]:
    """The full result: vLLM's keys first, then our metadata, client figures and (given the
    instances' counters before and after) prefix-cache and KV-transfer figures."""
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
    if plan.metadata:
        result["metadata"] = plan.metadata
    result.update(metrics)
    result["start_times"] = [out.start_s - outcome.bench_start_s for out in outputs]
    result.update(pareto_figures(outputs, metrics["output_throughput"], plan.num_gpus))
    result["max_concurrent_requests"] = max_concurrent_requests(outputs)
    result["max_output_tokens_per_s"] = max_output_tokens_per_s(outputs, outcome.bench_start_s)
    result.update(_client_figures(outcome, metrics["completed"]))
    if counters is not None:
        result.update(instance_metrics.cache_figures(counters, metrics["completed"]))
    return result


def result_path(args: argparse.Namespace, result: dict[str, Any], sweep_axis: str | None) -> Path:
    """``--result-dir/--result-filename``, with ``-c<N>``/``-r<R>`` per sweep point and
    ``-pd``/``-colocated`` for the runs of a comparison."""
    point_tag = f"-{result['compare_role']}" if result.get("compare_role") else ""
    if sweep_axis == "concurrency":
        point_tag += f"-c{result['max_concurrency']}"
    elif sweep_axis == "rate":
        rate = result["request_rate"]
        point_tag += f"-r{rate if isinstance(rate, str) else rate_label(rate)}"
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


async def _run_all(args: argparse.Namespace, plan: ServePlan, workload: Workload,
                   argv: list[str], role: str | None = None) -> list[dict[str, Any]]:
    """Every point of the run, in order (``role``: ``pd`` or ``colocated`` in a comparison)."""
    results = []
    for point, chains in zip(plan.points, workload.points, strict=True):
        if plan.sweep_axis or role:
            print(f"--- {role + ' ' if role else ''}point: max_concurrency="
                  f"{point.max_concurrency} request_rate={rate_label(point.request_rate)}",
                  flush=True)
        outcome, counters = await _run_point(args, point, chains, workload.warmups)
        result = build_result(args, plan, point, outcome, argv, counters)
        if role:
            result["compare_role"] = role
        _emit(args, plan, result)
        results.append(result)
    return results


def _stem(args: argparse.Namespace, default: str) -> Path:
    """``--result-dir/<--result-filename's stem or default>``: where plots and the comparison
    go."""
    return Path(args.result_dir) / (Path(args.result_filename).stem if args.result_filename
                                    else default)


def _plot(args: argparse.Namespace, sweep_axis: str,
          series: dict[str, list[dict[str, Any]]]) -> None:
    """Sweep plots next to the result JSON files (per run, and a Pareto view of all runs when
    there are several); a missing matplotlib is one warning."""
    try:
        from bench.plots import plot_pareto, plot_sweep
    except ImportError:
        print("warning: matplotlib is not installed; no plots", file=sys.stderr)
        return
    stem = _stem(args, "serve-sweep")
    paths = []
    for role, results in series.items():
        paths += plot_sweep(results, sweep_axis, Path(f"{stem}-{role}" if role else stem))
    if len(series) > 1:
        names = {"pd": "P/D", "colocated": "colocated"}
        title = " vs ".join(r[0].get("deployment") or names.get(k, k) for k, r in series.items())
        paths.append(plot_pareto({names.get(k, k): v for k, v in series.items()}, sweep_axis,
                                 Path(f"{stem}-pareto.png"), title))
    for path in paths:
        print(f"plot written to {path}", flush=True)


def _load_tokenizer(args: argparse.Namespace) -> Tokenizer:
    try:  # a Hub id must be in the local cache: prompts of byte ids would measure nothing
        return get_tokenizer(resolve_model(args.tokenizer or args.model))
    except ConfigError as exc:
        raise UsageError(f"{exc}; --tokenizer names the tokenizer when --model is only the "
                         "served name") from exc


def _workload(args: argparse.Namespace, plan: ServePlan, tokenizer: Tokenizer) -> Workload:
    try:
        return build_workload(args, plan, tokenizer)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _report_comparison(args: argparse.Namespace, plan: ServePlan, pd: list[dict[str, Any]],
                       colocated: list[dict[str, Any]]) -> None:
    """The comparison table and warning; its JSON and one row per point."""
    points = [compare_point(a, b, plan.sweep_axis) for a, b in zip(pd, colocated, strict=True)]
    warning = loss_warning(points, plan.goodput_slos_ms)
    print(format_comparison(points, f"{args.base_url} ({pd[0]['deployment'] or 'P/D'})",
                            f"{args.compare_colocated} ({colocated[0]['deployment']})",
                            warning), flush=True)
    if args.save_result or plan.sweep_axis:
        path = Path(f"{_stem(args, 'serve-' + pd[0]['date'])}-compare.json")
        write_json(path, comparison_result(points, [summary_row(r) for r in pd],
                                           [summary_row(r) for r in colocated], warning))
        print(f"comparison written to {path}", flush=True)
    if args.results_jsonl:
        for point, a, b in zip(points, pd, colocated, strict=True):
            append_row(Path(args.results_jsonl), comparison_row(point, a, b, a["command"]))


class _Run(NamedTuple):
    """One endpoint to measure: its options, its requests, its role in a comparison."""

    args: argparse.Namespace
    workload: Workload
    role: str | None
    """``pd`` or ``colocated`` with --compare-colocated, else None."""


async def _probe_and_run(runs: list[_Run], plan: ServePlan,
                         argv: list[str]) -> list[list[dict[str, Any]]]:
    """Probe every endpoint first (a wrong second URL fails before the long first run), then
    run them one after another."""
    for r in runs:
        await _probe(r.args, r.workload.probe)
    return [await _run_all(r.args, plan, r.workload, argv, r.role) for r in runs]


def run(argv: list[str]) -> int:
    """Parse, build the workload, run every point; raises UsageError for user errors."""
    args, plan = parse(argv)
    tokenizer = _load_tokenizer(args)
    runs = [_Run(args, _workload(args, plan, tokenizer),
                 "pd" if args.compare_colocated else None)]
    if args.compare_colocated:  # the same seed: the same prompts and arrival times
        other = colocated_args(args)
        runs.append(_Run(other, _workload(other, plan, tokenizer), "colocated"))
    try:
        results = asyncio.run(_probe_and_run(runs, plan, argv))
    except BenchmarkError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    if args.compare_colocated:
        _report_comparison(args, plan, results[0], results[1])
    if plan.sweep_axis:
        _plot(args, plan.sweep_axis,
              {r.role or "": res for r, res in zip(runs, results, strict=True)})
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``disagg bench serve``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: run(argv))
