"""silu_and_mul against silu_and_mul_ref: in the interpreter on CPU, and on a GPU."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    Case,
    CaseResult,
    compare,
    reference_tests,
    run_cases_main,
)

from hip_kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

CASES = [
    Case("silu_and_mul", dtype, {"shape": shape})
    for dtype in ("fp32", "fp16", "bf16")
    for shape in ((1, 2 * 1023), (3, 7, 2 * 129), (5, 2 * 64))
]
GPU_CASES = [Case("silu_and_mul", dtype, {"shape": (4096, 2 * 14336)})
             for dtype in ("fp32", "bf16")]


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Random input of the case's shape; kernel vs reference."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.params["shape"], generator=gen).to(case.torch_dtype).to(device)
    return compare(case.id, silu_and_mul(x), silu_and_mul_ref(x), case.torch_dtype)


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_odd_last_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul(torch.zeros(2, 5))



if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
