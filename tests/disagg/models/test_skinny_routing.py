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


def test_the_lm_head_writes_logits_into_a_given_buffer() -> None:
    """The decode graphs' path: logits in the model's dtype land in ``out`` (the GEMM's own
    output where it can, else a copy), equal to the plain forward's; fp32 ``out`` widens."""
    llm = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=16 * 2**20)
    model = llm.engine.runner.model
    head = model.lm_head
    hidden = torch.randn(5, head.in_features, generator=torch.Generator().manual_seed(2))
    want = head(hidden)
    for dtype in (want.dtype, torch.float32, torch.float64):
        out = torch.full((8, want.shape[-1]), float("nan"), dtype=dtype)
        got = head(hidden, out=out[:5])
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(out[:5], want.to(dtype)) and bool(out[5:].isnan().all())
    spy = _Spy()
    route_skinny(model, spy, 8)  # the few-rows kernel's output is copied into ``out``
    out = torch.empty(5, want.shape[-1], dtype=want.dtype)
    head(hidden, out=out)
    assert spy.rows == [5] and torch.allclose(out, want, atol=1e-5)
    assert torch.equal(model.compute_logits(hidden), want.float())
