"""Command line of ``disagg bench serve`` (flag names follow ``vllm bench serve``)."""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from bench.argparsing import Parser, UsageError, csv_numbers, key_values
from bench.client import COMPLETIONS, ENDPOINTS
from bench.datasets import DATASET_NAMES, FILE_DATASETS, DatasetConfig
from bench.metrics import parse_goodput, parse_metric_names, parse_percentiles


@dataclass(frozen=True, slots=True)
class Point:
    """One benchmark point of a run or sweep."""

    max_concurrency: int | None
    request_rate: float
    num_prompts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ServePlan:
    """Validated, parsed options that are not plain argparse values."""

    points: list[Point]
    sweep_axis: str | None
    """``"concurrency"``, ``"rate"`` or None for a single point."""
    percentile_metrics: list[str]
    percentiles: list[float]
    goodput_slos_ms: dict[str, float] | None
    extra_body: dict[str, Any] | None
    headers: dict[str, str] | None = None
    """``--header`` pairs, sent on every request (over the Authorization of --api-key)."""
    metadata: dict[str, str] | None = None
    """``--metadata`` pairs, stored in every result."""
    num_gpus: int = 1
    """GPUs of the measured deployment, for the per-GPU throughput."""


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root, e.g. the disagg proxy's http://127.0.0.1:8000")
    p.add_argument("--endpoint", default=COMPLETIONS, choices=ENDPOINTS,
                   help="OpenAI route the requests stream from")
    p.add_argument("--model", required=True, help="model name or path sent in each request")
    p.add_argument("--served-model-name",
                   help="request 'model' field when it differs (default: --model)")
    p.add_argument("--tokenizer", help="tokenizer for exact prompt lengths (default: --model)")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (default: none)")
    p.add_argument("--header", nargs="+", metavar="KEY=VALUE",
                   help="HTTP headers sent on every request, e.g. x-tenant=a (they override "
                        "--api-key's Authorization; default: none)")
    p.add_argument("--extra-body",
                   help="JSON object merged into every request body (default: none)")
    p.add_argument("--request-timeout-s", type=float, default=3600.0,
                   help="deadline of one request, stream included")
    p.add_argument("--compare-colocated", metavar="URL",
                   help="after the run against --base-url (a P/D deployment), run the same "
                        "requests, seed and sweep against URL (a colocated deployment) and "
                        "report both, their ratios and a WARNING when P/D loses on goodput "
                        "(on request throughput without --goodput) (default: no comparison)")


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    d = DatasetConfig()
    p.add_argument("--dataset-name", default="random", choices=DATASET_NAMES,
                   help="workload: synthetic (random, conversation, shared-prefix, multi-turn) "
                        "or read from --dataset-path (sharegpt, custom, hf)")
    p.add_argument("--dataset-path", metavar="PATH",
                   help="sharegpt: JSON file; custom: JSONL file with 'prompt' and optional "
                        "'output_tokens'; hf: a saved dataset directory or a hub id in the "
                        "local cache (default: none)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts,
                   help="requests per point")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the prompts, their order and the arrival times")
    p.add_argument("--random-input-len", type=int, default=d.random_input_len,
                   help="random, shared-prefix: mean prompt tokens (after any prefix)")
    p.add_argument("--random-output-len", type=int, default=d.random_output_len,
                   help="random, shared-prefix: mean output tokens")
    p.add_argument("--random-range-ratio", type=float, default=d.random_range_ratio,
                   help="lengths uniform in [len x (1 - r), len x (1 + r)]; 0: fixed")
    p.add_argument("--random-prefix-len", type=int, default=d.random_prefix_len,
                   help="random: tokens of one prefix every prompt starts with")
    p.add_argument("--conv-input-mean", type=float, default=d.conv_input_mean,
                   help="conversation: mean prompt tokens (lognormal)")
    p.add_argument("--conv-output-mean", type=float, default=d.conv_output_mean,
                   help="conversation: mean output tokens (lognormal)")
    p.add_argument("--conv-sigma", type=float, default=d.conv_sigma,
                   help="conversation: log-space standard deviation of both lengths")
    p.add_argument("--conv-max-len", type=int, default=d.conv_max_len,
                   help="conversation: longest prompt or output, tokens")
    p.add_argument("--shared-prefix-groups", type=int, default=d.shared_prefix_groups,
                   help="shared-prefix: distinct system prompts")
    p.add_argument("--shared-prefix-len", type=int, default=d.shared_prefix_len,
                   help="shared-prefix: tokens of each system prompt")
    p.add_argument("--multi-turn-conversations", type=int, default=d.multi_turn_conversations,
                   help="multi-turn: conversations per point (replaces --num-prompts)")
    p.add_argument("--multi-turn-turns", type=int, default=d.multi_turn_turns,
                   help="multi-turn: user turns per conversation, sent one after another")
    p.add_argument("--multi-turn-system-len", type=int, default=d.multi_turn_system_len,
                   help="multi-turn: tokens of each conversation's system prompt")
    p.add_argument("--multi-turn-user-len", type=int, default=d.multi_turn_user_len,
                   help="multi-turn: tokens of each user message (--random-range-ratio)")
    p.add_argument("--multi-turn-output-len", type=int, default=d.multi_turn_output_len,
                   help="multi-turn: tokens of each answer (--random-range-ratio)")
    _add_file_dataset_args(p, d)


def _add_file_dataset_args(p: argparse.ArgumentParser, d: DatasetConfig) -> None:
    p.add_argument("--sharegpt-output-len", type=int,
                   help="sharegpt: output tokens of every request (default: the token count of "
                        "each conversation's first answer)")
    p.add_argument("--custom-output-len", type=int, default=d.custom_output_len,
                   help="custom (and hf 'prompt' rows): output tokens of a row without "
                        "'output_tokens'")
    p.add_argument("--hf-subset", help="hf: subset (config name) of the dataset (default: none)")
    p.add_argument("--hf-split", default=d.hf_split, help="hf: split to read")
    p.add_argument("--hf-output-len", type=int,
                   help="hf: output tokens of every request (default: from each row)")
    p.add_argument("--disable-shuffle", action="store_true",
                   help="sharegpt, custom, hf: take rows in file order, not in a seeded random "
                        "order")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-concurrency", type=int,
                   help="most requests in flight (multi-turn: conversations; default: no cap)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="req/s; inf = all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    p.add_argument("--num-warmups", type=int, default=0,
                   help="untimed requests sent before every point")
    p.add_argument("--sweep-concurrency",
                   help="comma list, one result per value: 1,64,256 (default: one point)")
    p.add_argument("--sweep-rate",
                   help="comma list of request rates, one result per value (default: one "
                        "point)")
    p.add_argument("--prompts-per-concurrency", type=int,
                   help="with --sweep-concurrency: each point sends this many x concurrency "
                        "(multi-turn: conversations; default: --num-prompts per point)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                   help="comma list of the metrics whose percentiles are reported")
    p.add_argument("--metric-percentiles", default="50,90,99",
                   help="comma list of percentiles, each in (0, 100]")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs, e.g. ttft:500 tpot:50 e2el:10000 (default: no goodput)")
    p.add_argument("--save-result", action="store_true",
                   help="write the full result JSON (a sweep always does)")
    p.add_argument("--result-dir", default=".", help="where result JSON files and plots go")
    p.add_argument("--result-filename",
                   help="file name of the result JSON (default: serve-<rate>qps-c<N>-<model>-"
                        "<date>.json)")
    p.add_argument("--metadata", nargs="+", metavar="KEY=VALUE",
                   help="pairs stored in the result JSON and row under 'metadata', e.g. "
                        "tp=1 build=nightly (default: none)")
    p.add_argument("--num-gpus", type=int,
                   help="GPUs of the deployment, for output tok/s per GPU (default: x + y of a "
                        "--deployment that starts 'xPyD', else 1)")
    p.add_argument("--results-jsonl", default="", metavar="PATH",
                   help="append one summary row per point to this JSON-lines file (the "
                        "repository's bench/results/serve.jsonl feeds the README table; "
                        "default: none)")
    p.add_argument("--deployment", help='what was measured, e.g. "1P1D tcp read" (default: '
                                        'none)')
    p.add_argument("--colocated-deployment",
                   help="with --compare-colocated: what URL runs (default: 'colocated')")
    p.add_argument("--hardware", help="override the detected hardware line (default: detected)")
    p.add_argument("--label", help="free-form label stored in the result (default: none)")
    p.add_argument("--metrics-url", action="append", default=[], metavar="URL",
                   help="an instance's base URL (repeat for each): its /metrics counters are "
                        "read before and after each point for the prefix-cache hit rate and "
                        "the KV bytes moved per request (with --compare-colocated: the P/D "
                        "run's instances; default: none)")


def build_parser(prog: str = "disagg bench serve") -> Parser:
    """The ``serve`` argument parser."""
    p = Parser(prog=prog, description="Benchmark an OpenAI-compatible streaming endpoint.")
    _add_target_args(p)
    _add_dataset_args(p)
    _add_load_args(p)
    _add_output_args(p)
    return p


def dataset_config(args: argparse.Namespace, num_prompts: int) -> DatasetConfig:
    """The dataset options as a DatasetConfig for ``num_prompts`` requests (multi-turn:
    ``num_prompts // turns`` conversations)."""
    return DatasetConfig(
        name=args.dataset_name, num_prompts=num_prompts, seed=args.seed,
        dataset_path=args.dataset_path, sharegpt_output_len=args.sharegpt_output_len,
        custom_output_len=args.custom_output_len, hf_subset=args.hf_subset,
        hf_split=args.hf_split, hf_output_len=args.hf_output_len,
        shuffle=not args.disable_shuffle,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, random_prefix_len=args.random_prefix_len,
        conv_input_mean=args.conv_input_mean, conv_output_mean=args.conv_output_mean,
        conv_sigma=args.conv_sigma, conv_max_len=args.conv_max_len,
        shared_prefix_groups=args.shared_prefix_groups, shared_prefix_len=args.shared_prefix_len,
        multi_turn_conversations=num_prompts // args.multi_turn_turns
        if args.dataset_name == "multi-turn" else args.multi_turn_conversations,
        multi_turn_turns=args.multi_turn_turns, multi_turn_system_len=args.multi_turn_system_len,
        multi_turn_user_len=args.multi_turn_user_len,
        multi_turn_output_len=args.multi_turn_output_len)


def _points(args: argparse.Namespace) -> tuple[list[Point], str | None]:
    """The benchmark points: one, or one per sweep value. A multi-turn point sends whole
    conversations: its ``num_prompts`` is conversations x turns."""
    if args.sweep_concurrency and args.sweep_rate:
        raise UsageError("sweep one axis at a time: --sweep-concurrency or --sweep-rate")
    multi_turn = args.dataset_name == "multi-turn"
    turns = args.multi_turn_turns if multi_turn else 1
    num_prompts = args.multi_turn_conversations * turns if multi_turn else args.num_prompts
    if args.sweep_concurrency:
        per = args.prompts_per_concurrency
        return [Point(c, args.request_rate, per * c * turns if per else num_prompts)
                for c in csv_numbers(args.sweep_concurrency, int, "--sweep-concurrency")], \
            "concurrency"
    if args.sweep_rate:
        return [Point(args.max_concurrency, r, num_prompts)
                for r in csv_numbers(args.sweep_rate, float, "--sweep-rate")], "rate"
    return [Point(args.max_concurrency, args.request_rate, num_prompts)], None


def _check_numbers(args: argparse.Namespace) -> None:
    """Range checks argparse cannot express."""
    if args.num_prompts < 1:
        raise UsageError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UsageError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if args.request_rate <= 0 or args.burstiness <= 0:
        raise UsageError("--request-rate and --burstiness must be > 0")
    if args.num_warmups < 0 or (args.prompts_per_concurrency or 1) < 1:
        raise UsageError("--num-warmups must be >= 0 and --prompts-per-concurrency >= 1")
    if args.request_timeout_s <= 0:
        raise UsageError("--request-timeout-s must be > 0")
    if args.multi_turn_conversations < 1 or args.multi_turn_turns < 1:
        raise UsageError("--multi-turn-conversations and --multi-turn-turns must be at least 1")
    if args.num_gpus is not None and args.num_gpus < 1:
        raise UsageError(f"--num-gpus must be at least 1, got {args.num_gpus}")
    if args.dataset_name in FILE_DATASETS and not args.dataset_path:
        raise UsageError(f"--dataset-name {args.dataset_name} needs --dataset-path")
    if args.compare_colocated and \
            args.compare_colocated.rstrip("/") == args.base_url.rstrip("/"):
        raise UsageError("--compare-colocated must name another deployment than --base-url")


_XPYD = re.compile(r"\s*(\d+)P(\d+)D\b", re.IGNORECASE)


def num_gpus(args: argparse.Namespace) -> int:
    """--num-gpus, else x + y of a --deployment starting ``xPyD`` (one GPU each), else 1."""
    if args.num_gpus is not None:
        return int(args.num_gpus)
    m = _XPYD.match(args.deployment or "")
    return int(m.group(1)) + int(m.group(2)) if m else 1


def _extra_body(text: str | None) -> dict[str, Any] | None:
    """Parse --extra-body as a JSON object."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--extra-body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError("--extra-body must be a JSON object")
    return value


def parse(argv: list[str]) -> tuple[argparse.Namespace, ServePlan]:
    """Parse and validate; every user error raises UsageError with one line."""
    args = build_parser().parse_args(argv)
    _check_numbers(args)
    points, axis = _points(args)
    try:
        plan = ServePlan(points=points, sweep_axis=axis,
                         percentile_metrics=parse_metric_names(args.percentile_metrics),
                         percentiles=parse_percentiles(args.metric_percentiles),
                         goodput_slos_ms=parse_goodput(args.goodput) if args.goodput else None,
                         extra_body=_extra_body(args.extra_body),
                         headers=key_values(args.header, "--header"),
                         metadata=key_values(args.metadata, "--metadata"),
                         num_gpus=num_gpus(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return args, plan


def colocated_args(args: argparse.Namespace) -> argparse.Namespace:
    """The colocated run of --compare-colocated: the same options against its URL (no
    --metrics-url: those name the P/D instances)."""
    return argparse.Namespace(**{**vars(args), "base_url": args.compare_colocated,
                                 "deployment": args.colocated_deployment or "colocated",
                                 "metrics_url": []})


def workload_label(cfg: DatasetConfig) -> str:
    """A short description of the workload for result rows and the README table."""
    if cfg.name in FILE_DATASETS:
        return _file_workload_label(cfg)
    if cfg.name == "multi-turn":
        spread = f" range={cfg.random_range_ratio:g}" if cfg.random_range_ratio else ""
        return (f"multi-turn {cfg.multi_turn_conversations} conversations x "
                f"{cfg.multi_turn_turns} turns, system={cfg.multi_turn_system_len} "
                f"user={cfg.multi_turn_user_len} out={cfg.multi_turn_output_len}{spread}")
    if cfg.name == "conversation":
        return (f"conversation lognormal in~{cfg.conv_input_mean:g} "
                f"out~{cfg.conv_output_mean:g} sigma={cfg.conv_sigma:g}")
    shape = f"in={cfg.random_input_len} out={cfg.random_output_len}"
    if cfg.random_range_ratio:
        shape += f" range={cfg.random_range_ratio:g}"
    if cfg.name == "shared-prefix":
        return f"shared-prefix {cfg.shared_prefix_groups}x{cfg.shared_prefix_len} {shape}"
    return f"random {shape}" + (f" prefix={cfg.random_prefix_len}" if cfg.random_prefix_len
                                else "")


def _file_workload_label(cfg: DatasetConfig) -> str:
    """``sharegpt sharegpt.json out=128``, ``hf org/name:subset[test]``."""
    if cfg.name == "hf":
        subset = f":{cfg.hf_subset}" if cfg.hf_subset else ""
        fixed = f" out={cfg.hf_output_len}" if cfg.hf_output_len else ""
        return f"hf {cfg.dataset_path}{subset}[{cfg.hf_split}]{fixed}"
    name = PurePath(str(cfg.dataset_path)).name
    if cfg.name == "sharegpt":
        return f"sharegpt {name}" + (f" out={cfg.sharegpt_output_len}"
                                     if cfg.sharegpt_output_len else "")
    return f"custom {name}"
