"""Ahead-of-time compile results as benchmark rows (no GPU needed).

    python -m bench.aot_rows [--target hip:gfx942 ...] [--output bench/results/aot.jsonl]
                             [--commit SHA]

Runs hip_kernels.aot's compilations and appends one JSON row per (kernel spec, target): every
CompileReport field, ``spills``, the arch, and the run's metadata (date, commit, versions with
triton) as bench/metadata.py labels every row. Exit 1 if a kernel spills on AMD.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import RESULTS_DIR
from bench.metadata import run_metadata
from bench.results import append_row
from hip_kernels.aot import TARGETS, CompileReport, compile_all
from hip_kernels.launch_config import arch_for_target


def row_metadata(commit: str | None = None) -> dict[str, Any]:
    """The metadata block plus triton's version; ``commit`` overrides the checkout's."""
    import triton

    meta = run_metadata()
    meta["versions"] = {**meta["versions"], "triton": triton.__version__}
    if commit:
        meta["commit"] = commit
    return meta


def result_row(report: CompileReport, meta: dict[str, Any]) -> dict[str, Any]:
    """One JSON-lines row: the run's metadata, every CompileReport field, and ``spills``."""
    return {"bench": "aot", **meta, "arch": arch_for_target(report.target), **asdict(report),
            "spills": report.spills}


def main(argv: list[str] | None = None) -> int:
    """Compile, print and append the rows."""
    parser = argparse.ArgumentParser(prog="python -m bench.aot_rows",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", choices=TARGETS,
                        help="repeatable; default: all of " + ", ".join(TARGETS))
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "aot.jsonl")
    parser.add_argument("--commit", default=None,
                        help="commit to record when this copy is not a git checkout")
    args = parser.parse_args(argv)
    meta = row_metadata(args.commit)
    spilled = compile_all(args.target or list(TARGETS),
                          lambda report: append_row(args.output, result_row(report, meta)))
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
