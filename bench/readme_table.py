"""Generate the README benchmark table (markdown) from bench/results/*.jsonl rows.

Row contract (for every writer of bench/results/*.jsonl): a JSON object with ``kind``,
``hardware`` (``{"summary": str, ...}`` or a string), ``model`` or ``model_id``, ``workload``,
``command``, optional ``deployment`` and ``date``; figures either as the known keys of the
``serve``/``throughput``/``crosscheck`` kinds or as a ``figures`` object ``{name: value}``.
The transfer and proxy-overhead rows (``bench`` + ``config``) are understood as they are
(bench/table_cells.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench import RESULTS_DIR
from bench import table_cells as cells
from bench.argparsing import Parser, UsageError, run_cli
from bench.results import read_rows

PROG = "python -m bench.readme_table"
HEADER = ("| Hardware | Model | Workload | Key figures | Command |\n"
          "|---|---|---|---|---|")


def _cell(text: Any) -> str:
    """Markdown-safe table cell text."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_row(row: dict[str, Any]) -> str:
    """One markdown table line."""
    cmd = cells.command(row)
    line = (cells.hardware(row), cells.model(row), cells.workload(row), cells.figures(row),
            f"`{cmd}`" if cmd else "?")
    return "| " + " | ".join(_cell(c) for c in line) + " |"


def _key(row: dict[str, Any]) -> tuple[str, ...]:
    """Rows with the same key describe the same measurement; the newest one wins."""
    return (str(cells.kind(row)), cells.hardware(row), cells.model(row), cells.workload(row))


def collect_rows(results_dir: Path, kinds: list[str] | None, latest: bool) -> list[dict]:
    """Rows of every *.jsonl under ``results_dir`` (file order, then line order)."""
    rows = [row for path in sorted(results_dir.glob("*.jsonl")) for row in read_rows(path)]
    if kinds:
        rows = [row for row in rows if cells.kind(row) in kinds]
    if latest:
        by_key: dict[tuple[str, ...], dict] = {}
        for row in rows:
            by_key.pop(_key(row), None)  # re-insert so the newest keeps its place at the end
            by_key[_key(row)] = row
        rows = list(by_key.values())
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The whole markdown table."""
    return "\n".join([HEADER, *(format_row(row) for row in rows)])


def run(argv: list[str]) -> int:
    """Print the table; exit 2 with one line when there is nothing to show."""
    p = Parser(prog=PROG, description="Print the README benchmark table from result rows.")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--kinds", help="comma list, e.g. serve,throughput")
    p.add_argument("--all", action="store_true", help="keep every row, not only the newest")
    args: argparse.Namespace = p.parse_args(argv)
    results_dir = Path(args.results_dir)
    if not results_dir.is_dir():
        raise UsageError(f"no results directory: {results_dir}")
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else None
    rows = collect_rows(results_dir, kinds, latest=not args.all)
    if not rows:
        raise UsageError(f"no result rows in {results_dir}/*.jsonl")
    print(render(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
