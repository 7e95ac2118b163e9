"""Cross-check ``disagg bench serve`` against an independent client (NVIDIA aiperf).

Both clients send the *same* prompts (ours are written to an aiperf ``single_turn`` JSONL file
with per-request ``output_length``, ``min_tokens`` and ``ignore_eos``) to the same endpoint at
the same concurrency. TTFT p50 and output throughput of each, and ours/theirs ratios, become
one row of bench/results/crosscheck.jsonl. aiperf must live in its own virtualenv (it never
touches the project's torch)::

    python3 -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf==0.13.0
    python -m bench.crosscheck --base-url http://127.0.0.1:8000 --model builtin:tiny-llama \\
        --num-prompts 512 --max-concurrency 64 --repeats 3 --deployment "1P1D tcp read"

aiperf runs 7 Python processes and spends ~4-6 ms of CPU per request; on a small host with a
CPU-bound server they steal the server's cores (see ``client_cpu_s`` in the row) and the two
clients then measure different servers. On the 2-core CI-class host the comparison agreed
(TTFT p50 ratio 1.00, output throughput 1.00) once the server could not be disturbed: the
launch pinned to core 0, both clients to core 1, and a server-bound workload (1024 in / 64 out
at concurrency 2, so requests are few and long)::

    taskset -c 0 disagg-proxy --launch --num-prefill 1 --num-decode 1 \
        --model builtin:tiny-llama --device cpu --port 18801 &
    taskset -c 1 python -m bench.crosscheck --base-url http://127.0.0.1:18801 \
        --model builtin:tiny-llama --num-prompts 96 --random-input-len 1024 \
        --random-output-len 64 --max-concurrency 2 --repeats 3 \
        --aiperf-args "--workers-max 1 --record-processors 1 --export-level summary"

Unpinned, or at request rates where aiperf needs more than its one core, the ratios drift to
0.73-0.86 (TTFT) and 1.33-1.50 (throughput): rows in bench/results/crosscheck.jsonl. On a
host with spare cores, ``bench/crosscheck_device.sh`` runs the same check unpinned.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.argparsing import Parser, UsageError, run_cli
from bench.client import COMPLETIONS, ENDPOINTS
from bench.datasets import DatasetConfig, sample_requests
from bench.metadata import run_metadata
from bench.results import append_row
from disagg.common.tokenizer import get_tokenizer

PROG = "python -m bench.crosscheck"
DEFAULT_AIPERF = "/tmp/aiperf-venv/bin/aiperf"
_BYTE_TOKENS = 256


def build_parser() -> Parser:
    """The crosscheck argument parser."""
    p = Parser(prog=PROG, description="Compare our serving client with aiperf.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default=COMPLETIONS, choices=ENDPOINTS)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", help="default: --model")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--num-warmups", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed |ratio - 1|")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternate the two clients this many times; medians are compared")
    p.add_argument("--aiperf", default=shutil.which("aiperf") or DEFAULT_AIPERF,
                   help="the aiperf executable (its own virtualenv)")
    p.add_argument("--aiperf-args", default="",
                   help="extra aiperf flags, e.g. '--workers-max 1 --record-processors 1' "
                        "where aiperf's own processes would compete with the server for CPU")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="deadline for each client")
    p.add_argument("--work-dir", help="keep both clients' outputs here (default: temporary)")
    p.add_argument("--deployment")
    p.add_argument("--hardware")
    p.add_argument("--results-jsonl", default="", metavar="PATH",
                   help="append the row to this JSON-lines file (default: none; the "
                        "repository keeps bench/results/crosscheck.jsonl)")
    return p


def _byte_chars() -> dict[int, str]:
    """Byte -> printable unicode char, the byte-level BPE convention (GPT-2's alphabet)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    mapping, extra = {}, 0
    for b in range(_BYTE_TOKENS):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(_BYTE_TOKENS + extra)
            extra += 1
    return mapping


def write_byte_tokenizer(directory: Path) -> Path:
    """A Hugging Face tokenizer equal to disagg's builtin byte tokenizer (aiperf needs one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = _byte_chars()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(_BYTE_TOKENS)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|eos|>"])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
              "eos_token": "<|eos|>", "model_max_length": 1 << 30}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def write_aiperf_inputs(args: argparse.Namespace, path: Path) -> None:
    """Our measured prompts as aiperf single_turn lines, exact output length per request."""
    cfg = DatasetConfig(name="random", num_prompts=args.num_prompts + args.num_warmups,
                        seed=args.seed, random_input_len=args.random_input_len,
                        random_output_len=args.random_output_len)
    samples = sample_requests(cfg, get_tokenizer(args.tokenizer or args.model))
    # serve sends prompts [0, num_prompts) measured and the tail as warm-ups; aiperf sends its
    # warm-ups first from the same sequential list, so put the warm-up prompts first.
    ordered = samples[args.num_prompts:] + samples[:args.num_prompts]
    with path.open("w", encoding="utf-8") as f:
        for s in ordered:
            extra = {"min_tokens": s.expected_output_len, "ignore_eos": True, "temperature": 0.0}
            f.write(json.dumps({"text": s.prompt, "output_length": s.expected_output_len,
                                "extra": extra}) + "\n")


def run_ours(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """``disagg bench serve`` in this process; returns its saved result."""
    from bench.serve import main as serve_main

    argv = ["--base-url", args.base_url, "--endpoint", args.endpoint, "--model", args.model,
            "--num-prompts", str(args.num_prompts), "--random-input-len",
            str(args.random_input_len), "--random-output-len", str(args.random_output_len),
            "--max-concurrency", str(args.max_concurrency), "--num-warmups",
            str(args.num_warmups), "--seed", str(args.seed), "--save-result", "--result-dir",
            str(work_dir), "--result-filename", "ours.json", "--results-jsonl", "",
            "--request-timeout-s", str(args.timeout_s), "--disable-tqdm"]
    if args.tokenizer:
        argv += ["--tokenizer", args.tokenizer]
    if serve_main(argv) != 0:
        raise RuntimeError("our client failed; see the error above")
    return dict(json.loads((work_dir / "ours.json").read_text(encoding="utf-8")))


def aiperf_command(args: argparse.Namespace, inputs: Path, tokenizer_dir: str,
                   out_dir: Path) -> list[str]:
    """The aiperf command line for the same workload."""
    cmd = [args.aiperf, "profile", "--model", args.model, "--tokenizer", tokenizer_dir,
           "--url", args.base_url, "--streaming",
           "--endpoint-type", "chat" if args.endpoint.endswith("chat/completions")
           else "completions",
           "--input-file", str(inputs), "--custom-dataset-type", "single_turn",
           "--dataset-sampling-strategy", "sequential",
           "--request-count", str(args.num_prompts), "--concurrency", str(args.max_concurrency),
           "--use-server-token-count", "--use-legacy-max-tokens", "--random-seed",
           str(args.seed), "--output-artifact-dir", str(out_dir), "--ui-type", "none",
           "--no-server-metrics", "--no-gpu-telemetry", "--no-auto-plot"]
    if args.num_warmups:
        cmd += ["--warmup-request-count", str(args.num_warmups)]
    return cmd + shlex.split(args.aiperf_args)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_aiperf(cmd: list[str], out_dir: Path, timeout_s: float) -> tuple[dict[str, Any], float]:
    """Run aiperf under a deadline; its profile_export_aiperf.json and its CPU seconds."""
    cpu_start_s = _children_cpu_s()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"aiperf did not finish within {timeout_s:g} s") from exc
    cpu_s = _children_cpu_s() - cpu_start_s
    export = out_dir / "profile_export_aiperf.json"
    if proc.returncode != 0 or not export.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"aiperf failed (exit {proc.returncode}): {' / '.join(tail)}")
    return dict(json.loads(export.read_text(encoding="utf-8"))), cpu_s


@dataclass(frozen=True, slots=True)
class Figures:
    """What is compared, from one run of one client."""

    ttft_p50_ms: float
    output_throughput: float
    """Output tokens per second over the run's duration."""
    failed: int
    client_cpu_s: float
    """CPU the client burnt (all its processes): a client that competes with a CPU-bound
    server for cores slows the server down and the comparison means little."""


def our_figures(result: dict[str, Any]) -> Figures:
    """Figures from a ``disagg bench serve`` result."""
    return Figures(float(result["median_ttft_ms"]), float(result["output_throughput"]),
                   int(result["failed"]), float(result.get("client_cpu_s", 0.0)))


def aiperf_figures(export: dict[str, Any], client_cpu_s: float = 0.0) -> Figures:
    """Figures from aiperf's profile_export_aiperf.json."""
    return Figures(float(export["time_to_first_token"]["p50"]),
                   float(export["output_token_throughput"]["avg"]),
                   len(export.get("error_summary") or []), client_cpu_s)


def _ratio(ours: float, theirs: float) -> float | None:
    return ours / theirs if theirs else None


def make_row(args: argparse.Namespace, ours: list[Figures], theirs: list[Figures],
             client: str, argv: list[str]) -> dict[str, Any]:
    """The crosscheck row: medians over repeats, ours/theirs ratios, within tolerance?"""
    ours_ttft = statistics.median(f.ttft_p50_ms for f in ours)
    theirs_ttft = statistics.median(f.ttft_p50_ms for f in theirs)
    ours_tput = statistics.median(f.output_throughput for f in ours)
    theirs_tput = statistics.median(f.output_throughput for f in theirs)
    ttft_ratio, tput_ratio = _ratio(ours_ttft, theirs_ttft), _ratio(ours_tput, theirs_tput)
    ok = all(r is not None and abs(r - 1) <= args.tolerance for r in (ttft_ratio, tput_ratio))
    meta = run_metadata(args.deployment, args.hardware)
    return {
        "kind": "crosscheck", "date": meta["date"], "model": args.model,
        "workload": f"random in={args.random_input_len} out={args.random_output_len} "
                    f"concurrency {args.max_concurrency} x{args.num_prompts}",
        "command": f"{PROG} {shlex.join(argv)}", "deployment": args.deployment,
        "independent_client": client, "repeats": len(ours),
        "ours_ttft_p50_ms": ours_ttft, "theirs_ttft_p50_ms": theirs_ttft,
        "ttft_p50_ratio": ttft_ratio, "ours_output_throughput": ours_tput,
        "theirs_output_throughput": theirs_tput, "output_throughput_ratio": tput_ratio,
        "ours_runs": [asdict(f) for f in ours], "theirs_runs": [asdict(f) for f in theirs],
        "tolerance": args.tolerance, "within_tolerance": ok,
        "commit": meta["commit"], "hardware": meta["hardware"], "versions": meta["versions"],
    }


def _alternate(args: argparse.Namespace, work_dir: Path, inputs: Path,
               tokenizer_dir: str) -> tuple[list[Figures], list[Figures], str]:
    """Run ours then aiperf, ``--repeats`` times, so drift on the server hits both alike."""
    ours, theirs, version = [], [], "?"
    for i in range(args.repeats):
        ours.append(our_figures(run_ours(args, work_dir / f"ours-{i}")))
        out_dir = work_dir / f"aiperf-{i}"
        export, cpu_s = run_aiperf(aiperf_command(args, inputs, tokenizer_dir, out_dir),
                                   out_dir, args.timeout_s)
        theirs.append(aiperf_figures(export, cpu_s))
        version = str(export.get("aiperf_version", "?"))
    return ours, theirs, f"aiperf {version}"


def _crosscheck(args: argparse.Namespace, argv: list[str], work_dir: Path) -> int:
    """Run both clients in ``work_dir``, record and print the row."""
    work_dir.mkdir(parents=True, exist_ok=True)
    inputs = work_dir / "aiperf_inputs.jsonl"
    write_aiperf_inputs(args, inputs)
    tokenizer = args.tokenizer or args.model
    tokenizer_dir = str(write_byte_tokenizer(work_dir / "byte_tokenizer")) \
        if tokenizer.startswith("builtin:") else tokenizer
    try:
        ours, theirs, client = _alternate(args, work_dir, inputs, tokenizer_dir)
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    row = make_row(args, ours, theirs, client, argv)
    if args.results_jsonl:
        append_row(Path(args.results_jsonl), row)
    print(f"TTFT p50 ours {row['ours_ttft_p50_ms']:.2f} ms / aiperf "
          f"{row['theirs_ttft_p50_ms']:.2f} ms = {row['ttft_p50_ratio']:.3f}; output tok/s "
          f"ours {row['ours_output_throughput']:.1f} / aiperf "
          f"{row['theirs_output_throughput']:.1f} = {row['output_throughput_ratio']:.3f}; "
          f"{'within' if row['within_tolerance'] else 'OUTSIDE'} {args.tolerance:.0%}")
    return 0 if row["within_tolerance"] else 1


def run(argv: list[str]) -> int:
    """Validate, then cross-check in a work directory."""
    args = build_parser().parse_args(argv)
    if shutil.which(args.aiperf) is None:
        raise UsageError(f"aiperf not found at {args.aiperf}; install it in its own venv: "
                         "python3 -m venv /tmp/aiperf-venv && "
                         "/tmp/aiperf-venv/bin/pip install aiperf==0.13.0")
    if min(args.num_prompts, args.max_concurrency, args.random_input_len,
           args.random_output_len, args.repeats) < 1 or args.num_warmups < 0:
        raise UsageError("prompt counts, lengths, --max-concurrency and --repeats must be >= 1")
    if args.work_dir:
        return _crosscheck(args, argv, Path(args.work_dir))
    with tempfile.TemporaryDirectory(prefix="crosscheck-") as tmp:
        return _crosscheck(args, argv, Path(tmp))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 when both ratios are within tolerance, 1 otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
