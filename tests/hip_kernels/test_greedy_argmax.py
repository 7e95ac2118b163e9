"""greedy_argmax against torch.argmax, bit-exact (interpreter on CPU, and GPU): ties keep the
first index, within a lane, across lanes and across chunks; -inf rows, strided rows, tails."""

from __future__ import annotations

import os

import pytest
import torch
from kernel_testing import Case, CaseResult, compare, reference_tests, run_cases_main

from hip_kernels.greedy_argmax import greedy_argmax, greedy_argmax_ref
from hip_kernels.launch_config import overridden

SMALL = {"greedy_argmax": {"chunk": 64, "block": 16, "num_warps": 1}}
"""Small chunks so the interpreter crosses several of them."""
CASES = [Case("greedy_argmax", dtype, {"shape": shape, "fill": fill})
         for dtype in ("fp32", "bf16")
         for shape, fill in (((3, 200), "randn"), ((1, 64), "randn"), ((5, 131), "ties"),
                             ((4, 257), "ties_across_chunks"), ((2, 70), "neg_inf"),
                             ((3, 150), "strided"), ((2, 9), "randn"))]
GPU_CASES = [Case("greedy_argmax", dtype, {"shape": (b, 128256), "fill": fill})
             for dtype in ("fp32", "bf16") for b in (1, 64)
             for fill in ("randn", "ties_across_chunks")]


def make_logits(case: Case, device: str = "cpu") -> torch.Tensor:
    b, v = case.params["shape"]
    gen = torch.Generator().manual_seed(b * 1000 + v)
    fill = case.params["fill"]
    x = torch.randn(b, 2 * v if fill == "strided" else v, generator=gen)
    if fill == "strided":
        x = x[:, :v]
    elif fill == "ties":  # few distinct values: many equal maxima in every row
        x = torch.randint(0, 3, (b, v), generator=gen).float()
    elif fill == "ties_across_chunks":  # the max at several columns far apart, last one first
        x[:, [v - 1, v // 2, 3]] = 50.0
    elif fill == "neg_inf":
        x[0] = float("-inf")
        x[1, : v // 2] = float("-inf")
    return x.to(case.torch_dtype).to(device)


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    x = make_logits(case, device)
    with overridden(SMALL if device == "cpu" else {}):
        out = greedy_argmax(x)
    return compare(case.id, out, greedy_argmax_ref(x), torch.float32, exact=True)


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_the_ties_cases_really_tie():
    for case in CASES:
        if case.params["fill"].startswith("ties"):
            x = make_logits(case)
            assert bool(((x == x.max(dim=-1, keepdim=True).values).sum(-1) > 1).all())


def test_a_shape_it_cannot_take_is_a_clear_error():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.importorskip("triton")
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        greedy_argmax(torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        greedy_argmax(torch.zeros(2, 0))


if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
