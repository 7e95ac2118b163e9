"""``disagg bench throughput``: offline engine throughput in one process.

Default workload is nano-vllm's: 256 sequences, input and output lengths uniform in
[100, 1024], random token ids, ``ignore_eos`` so every sequence generates exactly its output
length. Reports output and total tokens/s; ``--results-jsonl PATH`` appends the row there.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.argparsing import Parser, UsageError, run_cli
from bench.datasets import safe_token_ids
from bench.metadata import run_metadata
from bench.results import append_row
from disagg.common.config import positive_int
from disagg.common.tokenizer import Tokenizer, get_tokenizer

PROG = "disagg bench throughput"
_LLM_OPTIONS = ("device", "dtype", "max_num_seqs", "max_num_batched_tokens",
                "kv_cache_memory_bytes", "load_format", "max_model_len")


def build_parser() -> Parser:
    """The ``throughput`` argument parser."""
    p = Parser(prog=PROG, description="Offline generation throughput of the disagg engine.")
    p.add_argument("--model", required=True, help="model directory or builtin:NAME")
    p.add_argument("--num-seqs", type=int, default=256, help="sequences generated")
    p.add_argument("--min-input-len", type=int, default=100,
                   help="shortest prompt, tokens (lengths are uniform)")
    p.add_argument("--max-input-len", type=int, default=1024, help="longest prompt, tokens")
    p.add_argument("--min-output-len", type=int, default=100,
                   help="fewest output tokens (EOS ignored)")
    p.add_argument("--max-output-len", type=int, default=1024, help="most output tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the lengths and token ids")
    p.add_argument("--num-warmups", type=int, default=1, help="short untimed sequences first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="engine device (default: the engine's)")
    p.add_argument("--dtype", help="weights dtype, e.g. bfloat16 (default: the engine's)")
    p.add_argument("--max-num-seqs", type=positive_int,
                   help="sequences per batch (default: the engine's)")
    p.add_argument("--max-num-batched-tokens", type=positive_int,
                   help="tokens per engine step (default: the engine's)")
    p.add_argument("--kv-cache-memory-bytes", type=positive_int,
                   help="KV cache budget in bytes (default: measured by the engine)")
    p.add_argument("--load-format", choices=("dummy", "auto"), default="dummy",
                   help="dummy: random weights of the model's shape; auto: load them")
    p.add_argument("--max-model-len", type=positive_int,
                   help="longest sequence (default: the engine's)")
    p.add_argument("--deployment",
                   help="free-form description stored in the row (default: none)")
    p.add_argument("--hardware", help="override the detected hardware line (default: detected)")
    p.add_argument("--results-jsonl", default="", metavar="PATH",
                   help="append the result row to this JSON-lines file (the repository's "
                        "bench/results/throughput.jsonl feeds the README table; default: none)")
    return p


def _validate(args: argparse.Namespace) -> None:
    """Range checks argparse cannot express."""
    if args.num_seqs < 1 or args.num_warmups < 0:
        raise UsageError("--num-seqs must be >= 1 and --num-warmups >= 0")
    if not 1 <= args.min_input_len <= args.max_input_len:
        raise UsageError("need 1 <= --min-input-len <= --max-input-len")
    if not 1 <= args.min_output_len <= args.max_output_len:
        raise UsageError("need 1 <= --min-output-len <= --max-output-len")


def make_workload(args: argparse.Namespace,
                  tokenizer: Tokenizer) -> tuple[list[list[int]], list[int]]:
    """Random prompts (token ids) and output lengths, seeded."""
    rng = np.random.default_rng(args.seed)
    # Real, non-special tokens: nano-vllm draws from [0, 10000), which a byte vocab lacks.
    candidates = safe_token_ids(tokenizer, rng)
    input_lens = rng.integers(args.min_input_len, args.max_input_len + 1, size=args.num_seqs)
    output_lens = rng.integers(args.min_output_len, args.max_output_len + 1, size=args.num_seqs)
    prompts = [rng.choice(candidates, size=int(n)).tolist() for n in input_lens]
    return prompts, [int(n) for n in output_lens]


def _import_engine() -> tuple[Any, Any]:
    """``disagg.llm.LLM`` and ``SamplingParams``, or UsageError when the engine is missing."""
    try:
        from disagg.llm import LLM
    except ImportError as exc:
        raise UsageError(f"the offline engine (disagg.llm) is not available: {exc}") from exc
    from disagg.common.sampling_params import SamplingParams

    return LLM, SamplingParams


def _params(sampling_params_cls: Any, output_lens: list[int]) -> list[Any]:
    """Exact-length sampling: ignore_eos, max_tokens = min_tokens = output length."""
    return [sampling_params_cls(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=1.0)
            for n in output_lens]


def _time_generate(llm: Any, prompts: list[list[int]], params: list[Any]) -> tuple[float, int]:
    """Seconds spent in generate and the output tokens actually produced."""
    start_s = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed_s = time.perf_counter() - start_s
    return elapsed_s, sum(len(out.output_token_ids) for out in outs)


def _row(args: argparse.Namespace, argv: list[str], prompts: list[list[int]],
         elapsed_s: float, num_output_tokens: int) -> dict[str, Any]:
    """The result row (metadata + figures)."""
    num_input_tokens = sum(len(p) for p in prompts)
    meta = run_metadata(args.deployment, args.hardware)
    return {
        "kind": "throughput", "date": meta["date"], "model": args.model,
        "workload": (f"{args.num_seqs} seqs in={args.min_input_len}-{args.max_input_len} "
                     f"out={args.min_output_len}-{args.max_output_len} ignore_eos"),
        "command": f"{PROG} {shlex.join(argv)}", "engine_options": _llm_kwargs(args),
        "num_seqs": args.num_seqs, "total_input_tokens": num_input_tokens,
        "total_output_tokens": num_output_tokens, "duration": elapsed_s,
        "output_throughput": num_output_tokens / elapsed_s,
        "total_token_throughput": (num_input_tokens + num_output_tokens) / elapsed_s,
        "request_throughput": args.num_seqs / elapsed_s,
        "commit": meta["commit"], "hardware": meta["hardware"], "versions": meta["versions"],
        "deployment": args.deployment,
    }


def _llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only the engine options the user set; the engine's own defaults stand for the rest."""
    return {name: getattr(args, name) for name in _LLM_OPTIONS
            if getattr(args, name) is not None}


def run(argv: list[str]) -> int:
    """Build the engine, warm it up, time one generate over the whole workload."""
    args = build_parser().parse_args(argv)
    _validate(args)
    llm_cls, sampling_params_cls = _import_engine()
    prompts, output_lens = make_workload(args, get_tokenizer(args.model))
    try:
        llm = llm_cls(args.model, **_llm_kwargs(args))
    except (ValueError, OSError) as exc:  # bad model path or engine options
        raise UsageError(f"cannot build the engine for {args.model}: {exc}") from exc
    if args.num_warmups:
        warmup_prompts = prompts[:args.num_warmups]
        llm.generate(warmup_prompts, _params(sampling_params_cls, [16] * len(warmup_prompts)))
    elapsed_s, num_output_tokens = _time_generate(llm, prompts,
                                                  _params(sampling_params_cls, output_lens))
    row = _row(args, argv, prompts, elapsed_s, num_output_tokens)
    print(f"{args.num_seqs} seqs, {num_output_tokens} output tokens in {elapsed_s:.2f} s: "
          f"{row['output_throughput']:.1f} output tok/s, "
          f"{row['total_token_throughput']:.1f} total tok/s")
    if args.results_jsonl:
        append_row(Path(args.results_jsonl), row)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``disagg bench throughput``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: run(argv))
