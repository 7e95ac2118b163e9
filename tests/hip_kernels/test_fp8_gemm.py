"""fp8_gemm against fp8_gemm_ref (interpreter on CPU, and GPU) over every scale layout; the
reference against a hand-written dequantization. Quantization error against unquantized
weights: tests/disagg/models/test_quant.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from kernel_testing import (
    Case,
    CaseResult,
    compare,
    reference_tests,
    run_cases_main,
    same_signature,
)

from hip_kernels.fp8_gemm import (
    dequantize_fp8,
    fp8_gemm,
    fp8_gemm_ref,
    gemm_plan,
    scale_layout,
)
from hip_kernels.launch_config import KNOWN_ARCHS, OVERRIDE_ENV

# (M, N, K): odd sizes, K tails inside a 128 block, N tails inside a column block; M = 70
# reaches the third block_m bucket of the default config, M = 0 is the empty batch.
SHAPES = ((1, 33, 129), (3, 200, 300), (17, 130, 257), (70, 96, 160), (5, 1, 40))
SCALES = ("block", "tensor", "rows", "rows1", "block_rows1")
CASES = [
    Case("fp8_gemm", dtype, {"shape": shape, "scales": scales, "fp8": fp8})
    for dtype in ("fp32", "fp16", "bf16")
    for shape, scales, fp8 in zip(SHAPES, SCALES, ("fn", "fnuz", "fn", "fnuz", "fn"))
] + [Case("fp8_gemm", "bf16", {"shape": (0, 40, 64), "scales": "block", "fp8": "fn"}),
     Case("fp8_gemm", "bf16", {"shape": (4, 256, 384), "scales": "block", "fp8": "fnuz",
                               "x": "strided"})] + [
    # K split in 3 (the last split shorter, K tail inside a 128 block) and in 8 (splits
    # past the end of K add zeros): fp32 partials summed by the launcher
    Case("fp8_gemm", dtype, {"shape": (2, 40, 300), "scales": scales, "fp8": "fn",
                             "split_k": split})
    for dtype, scales, split in (("fp32", "block", 3), ("bf16", "tensor", 3),
                                 ("fp16", "rows", 8))]
GPU_CASES = [Case("fp8_gemm", "bf16", {"shape": (m, n, k), "scales": scales, "fp8": "fn"})
             for m, n, k in ((1, 4096, 4096), (64, 6144, 4096), (1000, 4096, 14336))
             for scales in ("block", "tensor")]
FP8 = {"fn": torch.float8_e4m3fn, "fnuz": torch.float8_e4m3fnuz}


def scale_shape(kind: str, n: int, k: int) -> tuple[int, ...]:
    """The scale tensor's shape for a layout name."""
    nb, kb = -(-n // 128), -(-k // 128)
    return {"block": (nb, kb), "tensor": (), "rows": (n, kb), "rows1": (n, 1),
            "block_rows1": (nb, 1)}[kind]


def make_inputs(case: Case, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """x O(1); fp8 weights over the format's range; positive scales of about 1 / sqrt(K * 100)
    so that y is O(1)."""
    m, n, k = case.params["shape"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    if case.params.get("x") == "strided":
        x = torch.cat([x, torch.zeros_like(x)], dim=1)[:, :k]
    weight = (torch.randn(n, k, generator=gen) * 40).clamp(-200, 200)
    scale = (0.5 + torch.rand(scale_shape(case.params["scales"], n, k), generator=gen)) \
        / (40 * k ** 0.5)
    return (x.to(case.torch_dtype).to(device), weight.to(FP8[case.params["fp8"]]).to(device),
            scale.to(device))


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Kernel vs reference in the case's dtype."""
    x, weight, scale = make_inputs(case, device)
    split = case.params.get("split_k")
    if split is not None:  # the launcher reads the config at each call
        os.environ[OVERRIDE_ENV] = json.dumps({"fp8_gemm": {"split_k": [[1048576, split]],
                                                            "block_k": [[1048576, 32]]}})
    try:
        y = fp8_gemm(x, weight, scale)
    finally:
        os.environ.pop(OVERRIDE_ENV, None)
    return compare(case.id, y, fp8_gemm_ref(x, weight, scale), case.torch_dtype)


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_launcher_takes_the_reference_signature():
    assert same_signature(fp8_gemm, fp8_gemm_ref)


def test_reference_dequantizes_each_block_with_its_scale():
    weight = torch.tensor([[1.0, -2.0, 0.5], [4.0, 0.25, -1.0]]).to(torch.float8_e4m3fn)
    w = dequantize_fp8(weight, torch.tensor([[3.0]]))
    assert torch.equal(w, weight.float() * 3.0)
    big = torch.ones(130, 260).to(torch.float8_e4m3fn)
    scale = torch.arange(6, dtype=torch.float32).view(2, 3)
    w = dequantize_fp8(big, scale)
    assert w[0, 0] == 0 and w[127, 128] == 1 and w[0, 256] == 2 and w[128, 0] == 3
    assert w[129, 259] == 5
    x = torch.randn(3, 260, dtype=torch.float64)
    assert torch.allclose(fp8_gemm_ref(x, big, scale), x @ w.double().t())


def test_scale_layouts_are_read_from_shapes():
    assert scale_layout((300, 200), (3, 2)).rows_per_scale == 128
    assert scale_layout((300, 200), (300, 2)).rows_per_scale == 1
    assert scale_layout((300, 200), ()).rows_per_scale == 300
    assert not scale_layout((300, 200), (300, 1)).k_blocked
    with pytest.raises(ValueError, match="does not fit"):
        scale_layout((300, 200), (4, 2))


def test_every_arch_plan_keeps_k_tiles_inside_one_scale_block():
    for arch in ("default", *KNOWN_ARCHS):
        for rows in (1, 16, 64, 65, 256, 257, 5000):
            assert 128 % gemm_plan(rows, arch).block_k == 0


def test_non_fp8_weight_is_a_clear_error():
    with pytest.raises(ValueError, match="must be fp8"):
        fp8_gemm(torch.zeros(2, 8), torch.zeros(4, 8), torch.ones(()))



if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
