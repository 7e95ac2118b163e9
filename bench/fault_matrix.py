"""The fault matrix as a result row: every injected fault x {tcp, nixl} x {read, write}.

    python -m bench.fault_matrix [--output bench/results/fault_matrix.jsonl] [--no-save]

Runs the matrix test (tests/connectors/test_pd_faults.py: real prefill and decode processes,
faults set through ``POST /v1/kv_faults``) and appends one row: how many requests returned the
monolithic tokens, how many failed cleanly, and how many returned other tokens (must be 0), per
transport and mode and in total, with the pytest exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.metadata import run_metadata
from bench.results import append_row

REPO = Path(__file__).resolve().parent.parent
RESULT_FILE = REPO / "bench" / "results" / "fault_matrix.jsonl"
TEST = "tests/connectors/test_pd_faults.py"
KINDS = ("equal", "error", "wrong", "bad_error")


def run_matrix(timeout_s: float) -> tuple[int, list[dict[str, Any]]]:
    """Run the matrix test; its exit code and one record per (transport, mode, fault)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cases.jsonl"
        env = dict(os.environ, DISAGG_FAULT_MATRIX_OUT=str(out))
        # every case, the slow ones too (the default suite runs the nixl cases whose faults
        # act above the transport on tcp only)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
               "not gpu and not multi_gpu", TEST]
        code = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout_s, check=False).returncode
        lines = out.read_text(encoding="utf-8").splitlines() if out.exists() else []
    return code, [json.loads(line) for line in lines]


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals, and totals per transport-mode."""
    groups: dict[str, dict[str, int]] = {}
    for c in cases:
        g = groups.setdefault(f"{c['transport']}-{c['mode']}", dict.fromkeys(KINDS, 0))
        for k in KINDS:
            g[k] += int(c[k])
    total = {k: sum(g[k] for g in groups.values()) for k in KINDS}
    return {"faults": len({c["fault"] for c in cases}), "cases": len(cases),
            "requests": sum(total.values()), **total, "by_deployment": groups}


def main(argv: list[str] | None = None) -> int:
    """Run, print the summary, append the row."""
    parser = argparse.ArgumentParser(prog="python -m bench.fault_matrix")
    parser.add_argument("--output", default=str(RESULT_FILE), help="JSON-lines file to append")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args(argv)
    code, cases = run_matrix(args.timeout_s)
    if not cases:
        print("fault_matrix: the matrix test recorded no case", file=sys.stderr)
        return 1
    row = {"bench": "fault_matrix", **run_metadata("1P1D per transport x mode, CPU, "
                                                   "builtin:tiny-llama"),
           "pytest_exit": code, **summarize(cases), "per_case": cases}
    print(json.dumps({k: v for k, v in row.items() if k != "per_case"}, indent=1))
    if not args.no_save:
        append_row(Path(args.output), row)
        print(f"appended a row to {args.output}")
    return 0 if code == 0 and row["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
