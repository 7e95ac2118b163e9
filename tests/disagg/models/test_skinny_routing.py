"""Plain linears take the few-rows kernel (hip_kernels/skinny_gemm.py) only up to the arch's
row bound, fp8 layers never, and the model's output does not change for it."""

from __future__ import annotations

import torch

from disagg.common.sampling_params import SamplingParams
from disagg.llm import LLM
from disagg.models.parallel import LinearBase, ParallelLMHead, route_skinny
from hip_kernels.skinny_gemm import skinny_gemm_ref


class _Spy:
    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        self.rows.append(x.numel() // x.shape[-1])
        return skinny_gemm_ref(x, weight, bias)


def _prompts() -> list[list[int]]:
    return [[3 + (7 * i + j) % 200 for j in range(n)] for i, n in enumerate((5, 40, 17))]


def test_routed_layers_see_only_few_rows_and_the_tokens_do_not_change() -> None:
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    plain = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=16 * 2**20)
    expected = [o.output_token_ids for o in plain.generate(_prompts(), sp)]
    llm = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=16 * 2**20)
    spy = _Spy()
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, LinearBase | ParallelLMHead)]
    assert any(isinstance(m, ParallelLMHead) for m in linears)  # the LM head too
    assert route_skinny(model, spy, 4) == len(linears) > 1
    got = [o.output_token_ids for o in llm.generate(_prompts(), sp)]
    assert got == expected
    assert spy.rows and max(spy.rows) <= 4  # the prefills (5+ rows) went to F.linear
    assert 3 in spy.rows  # the three decode rows of one step


def test_a_zero_bound_routes_nothing_and_fp8_layers_are_left_alone() -> None:
    llm = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=16 * 2**20)
    model = llm.engine.runner.model
    assert route_skinny(model, _Spy(), 0) == 0
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    linears[0].quant = object()  # as quant.py marks an fp8 layer
    assert route_skinny(model, _Spy(), 8) == len(linears) - 1 + 1  # and the LM head
    assert linears[0].skinny is None and all(m.skinny is not None for m in linears[1:])
    assert llm.engine.runner.ops.skinny_rows == 0  # CPU: never routed by the loader
