"""Kernel test support: the tolerance table per dtype, comparison, interpreter subprocesses.

``TRITON_INTERPRET=1`` is read when triton is imported and holds for the whole process, so the
kernels' CPU checks run in a child process (one per test module) while the pytest process
keeps compiled-mode triton for everyone else:

    pytest process                         child: TRITON_INTERPRET=1 python test_x.py
    interpreter_results(test_x.py) ----->  run_cases_main(CASES, run_case)
          <---- one JSON line per case ---  ("@@case {...}")
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "@@case "
INTERPRETER_TIMEOUT_S = 300.0

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # (atol, rtol) against an fp32 reference: |out - ref| <= atol + rtol * |ref|.
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@dataclass(frozen=True)
class Case:
    """One kernel-vs-reference comparison: what runs, in which dtype, at which sizes."""

    name: str
    dtype: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def id(self) -> str:
        """Stable readable id, e.g. ``rms_norm-bf16-shape3x7x129``."""
        parts = [self.name, self.dtype]
        parts += [f"{key}{_format_param(value)}" for key, value in self.params.items()]
        return "-".join(parts)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The case's dtype as a torch dtype."""
        return DTYPES[self.dtype]


def _format_param(value: Any, depth: int = 0) -> str:
    """(3, 7, 129) -> 3x7x129; ((0, 5), (7, 3)) -> 0+5x7+3."""
    if isinstance(value, tuple | list):
        return ("x" if depth == 0 else "+").join(_format_param(v, depth + 1) for v in value)
    return str(value)


@dataclass(frozen=True, slots=True)
class CaseResult:
    """Outcome of one case; ``detail`` says what differed or what raised."""

    case_id: str
    ok: bool
    max_abs_err: float
    detail: str = ""


def compare(case_id: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
            exact: bool = False) -> CaseResult:
    """Compare out to ref with the dtype's tolerances (or bit-exactly for copies)."""
    if out.shape != ref.shape:
        return CaseResult(case_id, False, float("inf"),
                          f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if out.dtype != ref.dtype:
        return CaseResult(case_id, False, float("inf"), f"dtype {out.dtype} != {ref.dtype}")
    diff = (out.double() - ref.double()).abs()
    max_err = float(diff.max()) if diff.numel() else 0.0
    if exact:
        ok = bool(torch.equal(out, ref))
        return CaseResult(case_id, ok, max_err, "" if ok else "not bit-exact")
    atol, rtol = TOLERANCES[dtype]
    bad = ~(diff <= atol + rtol * ref.double().abs())
    num_bad = int(bad.sum())
    detail = f"{num_bad}/{diff.numel()} outside atol={atol} rtol={rtol}" if num_bad else ""
    return CaseResult(case_id, num_bad == 0, max_err, detail)


def combine(results: Iterable[CaseResult]) -> CaseResult:
    """One result for a kernel with several outputs: ok only if all are."""
    items = list(results)
    failed = [r.detail for r in items if not r.ok]
    return CaseResult(items[0].case_id, not failed, max(r.max_abs_err for r in items),
                      "; ".join(failed))


def run_cases_main(cases: Iterable[Case], run_case: Callable[[Case], CaseResult]) -> int:
    """Child side: run every case, print one ``@@case`` JSON line each; 0 if all ran."""
    for case in cases:
        try:
            result = run_case(case)
        except Exception:
            result = CaseResult(case.id, False, float("inf"), traceback.format_exc(limit=8))
        row = {"case_id": case.id, "ok": result.ok, "max_abs_err": result.max_abs_err,
               "detail": result.detail}
        print(RESULT_PREFIX + json.dumps(row), flush=True)
    return 0


def interpreter_results(test_file: str | Path,
                        timeout_s: float = INTERPRETER_TIMEOUT_S) -> dict[str, CaseResult]:
    """Parent side: run ``test_file`` as a script under TRITON_INTERPRET=1; results by id."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([sys.executable, str(test_file)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"interpreter run of {test_file} took over {timeout_s:.0f} s") from exc
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            row = json.loads(line[len(RESULT_PREFIX):])
            results[row["case_id"]] = CaseResult(**row)
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"interpreter run of {test_file} failed (rc={proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return results


def same_signature(launcher: Callable[..., Any], reference: Callable[..., Any]) -> bool:
    """Whether a launcher takes exactly the reference's parameters (the engine's contract)."""
    names = lambda fn: [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]
    return names(launcher) == names(reference)


def failure_message(result: CaseResult | None, case_id: str) -> str:
    """Assertion message for a case that failed or never reported."""
    if result is None:
        return f"{case_id}: the interpreter run reported nothing for this case"
    return f"{case_id}: max abs err {result.max_abs_err:.3g}; {result.detail}"


def reference_tests(test_file: str | Path, cases: list[Case], gpu_cases: list[Case],
                    run_case: Callable[[Case, str], CaseResult]) -> tuple[Any, Any, Any]:
    """The three pieces every kernel test module binds at module level:

        interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \\
            reference_tests(__file__, CASES, GPU_CASES, run_case)

    a module fixture running all ``cases`` once in a TRITON_INTERPRET=1 child process, one
    test per case reading its result, and one GPU test (marked ``gpu``) per ``gpu_cases``."""
    import pytest

    @pytest.fixture(scope="module")
    def interpreted() -> dict[str, CaseResult]:
        return interpreter_results(test_file)

    @pytest.mark.parametrize("case", cases, ids=lambda c: c.id)
    def test_matches_reference_in_interpreter(case: Case,
                                              interpreted: dict[str, CaseResult]) -> None:
        result = interpreted.get(case.id)
        assert result is not None and result.ok, failure_message(result, case.id)

    @pytest.mark.gpu
    @pytest.mark.parametrize("case", gpu_cases, ids=lambda c: c.id)
    def test_matches_reference_on_gpu(case: Case) -> None:
        result = run_case(case, "cuda")
        assert result.ok, failure_message(result, case.id)

    return interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu
