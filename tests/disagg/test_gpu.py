"""GPU path: Triton kernels in the engine give the CPU reference path's greedy outputs."""

from __future__ import annotations

import random

import pytest
import torch

from disagg.common.sampling_params import SamplingParams
from disagg.llm import LLM

pytestmark = pytest.mark.gpu


def _prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_builtin_gpu_matches_cpu_reference() -> None:
    prompts = _prompts(256, [1, 7, 16, 33, 100, 300])
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    cpu = LLM(device="cpu", kv_cache_memory_bytes=32 * 2**20).generate(prompts, sp)
    gpu_llm = LLM(device="cuda", dtype="float32", kv_cache_memory_bytes=32 * 2**20,
                  max_num_batched_tokens=128)
    assert gpu_llm.engine.runner.ops.backend == "triton"
    gpu = gpu_llm.generate(prompts, sp)
    assert [o.output_token_ids for o in gpu] == [o.output_token_ids for o in cpu]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tiny_qwen3_gpu_matches_transformers(tmp_path: object) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=512, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(str(tmp_path))
    prompts = _prompts(300, [3, 16, 50])
    expected = []
    for p in prompts:
        g = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        expected.append(g[0, len(p):].tolist())
    llm = LLM(str(tmp_path), device="cuda", dtype="float32", kv_cache_memory_bytes=8 * 2**20)
    got = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.output_token_ids for o in got] == expected
