"""rms_norm and fused_add_rms_norm against their references: interpreter on CPU, and GPU."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    Case,
    CaseResult,
    combine,
    compare,
    reference_tests,
    run_cases_main,
)

from hip_kernels.rms_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)

EPS = 1e-6
SHAPES = ((1, 1023), (3, 7, 129), (4, 64))
CASES = [
    Case(name, dtype, {"shape": shape})
    for name in ("rms_norm", "fused_add_rms_norm")
    for dtype in ("fp32", "fp16", "bf16")
    for shape in SHAPES
] + [
    # fp32 weight with bf16 activations: the output dtype follows torch promotion (fp32).
    Case("rms_norm", "bf16", {"shape": (5, 96), "weight": "fp32"}),
    # rows of a wider tensor (stride 2 * H), as when x is a slice of a fused projection.
    Case("fused_add_rms_norm", "bf16", {"shape": (6, 80), "strided": 1}),
]
GPU_CASES = [Case(name, dtype, {"shape": (4096, hidden)})
             for name in ("rms_norm", "fused_add_rms_norm")
             for dtype in ("fp32", "bf16") for hidden in (4096, 8192)]


def _inputs(case: Case, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual, weight for the case (x strided when asked)."""
    gen = torch.Generator().manual_seed(0)
    shape = case.params["shape"]
    wide = (*shape[:-1], shape[-1] * 2) if case.params.get("strided") else shape
    x = torch.randn(wide, generator=gen)[..., :shape[-1]]
    residual = torch.randn(shape, generator=gen)
    weight = 1 + 0.1 * torch.randn(shape[-1], generator=gen)
    weight_dtype = torch.float32 if case.params.get("weight") == "fp32" else case.torch_dtype
    return (x.to(case.torch_dtype).to(device), residual.to(case.torch_dtype).to(device),
            weight.to(weight_dtype).to(device))


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Kernel vs reference on every output."""
    x, residual, weight = _inputs(case, device)
    if case.name == "rms_norm":
        return compare(case.id, rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS),
                       case.torch_dtype)
    out, new_res = fused_add_rms_norm(x, residual, weight, EPS)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual, weight, EPS)
    return combine([compare(case.id, out, ref_out, case.torch_dtype),
                    compare(case.id, new_res, ref_res, case.torch_dtype)])


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_mismatched_residual_is_a_clear_error():
    with pytest.raises(ValueError, match="differ"):
        fused_add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8), EPS)


def test_too_wide_rows_are_a_clear_error():
    with pytest.raises(ValueError, match="larger than this kernel supports"):
        rms_norm(torch.zeros(1, 70000), torch.ones(70000), EPS)



if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
