"""The engine's forward records no autograd graph: no activation outlives its step.

With autograd recording, the CPU cache write (``index_copy_`` into the pool) gave the pool a
``grad_fn`` that chained every step's activations to it, so an instance's memory grew by the
activations of every prompt it ever served (512 MiB per 2k-token prompt of the tiny model,
until the OOM killer took the engine core). Two guards, each tested alone: the weights ask for
no gradient, and the step runs in inference mode whatever the weights ask.
"""

from __future__ import annotations

import gc

import pytest
import torch

from disagg.common.sampling_params import SamplingParams
from disagg.llm import LLM

PROMPT_LENS = (40, 77, 130)


def _graph_tensors() -> int:
    """Live tensors that carry an autograd history."""
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if isinstance(o, torch.Tensor) and o.grad_fn is not None)


def _serve(llm: LLM, rounds: int) -> None:
    for r in range(rounds):
        prompts = [[3 + (r * 7 + i * 13 + j) % 200 for j in range(n)]
                   for i, n in enumerate(PROMPT_LENS)]
        llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))


def _assert_no_history(llm: LLM, before: int) -> None:
    """``before``: tensors with a history that other tests left alive."""
    cache = llm.engine.runner.kv_cache
    assert cache is not None
    assert cache.grad_fn is None and not cache.requires_grad
    assert _graph_tensors() == before


@pytest.mark.parametrize("model", ["builtin:tiny-llama", "builtin:tiny-moe"])
def test_loaded_weights_ask_for_no_gradient(model: str) -> None:
    before = _graph_tensors()
    llm = LLM(model, device="cpu", kv_cache_memory_bytes=16 * 2**20)
    assert not any(p.requires_grad for p in llm.engine.runner.model.parameters())
    _serve(llm, 2)
    _assert_no_history(llm, before)


def test_a_step_records_nothing_even_with_weights_that_ask_for_gradients() -> None:
    before = _graph_tensors()
    llm = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=16 * 2**20,
              enable_prefix_caching=False)
    llm.engine.runner.model.requires_grad_(True)  # only inference mode stands in the way now
    _serve(llm, 3)
    _assert_no_history(llm, before)
    assert llm.ledger()["free"] == llm.ledger()["total"]
