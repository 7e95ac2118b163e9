"""Greedy outputs equal Hugging Face transformers' generate, token for token."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

from disagg.common.sampling_params import SamplingParams
from disagg.llm import LLM
from disagg.models.builtin import builtin_hf_config
from disagg.models.loader import builtin_state_dict
from tests.disagg.models.hf_reference import MAX_NEW, hf_greedy, mixed_prompts


@pytest.fixture(scope="module")
def hf_tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in builtin_hf_config("builtin:tiny-llama").items()
           if k not in ("model_type", "architectures", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.load_state_dict(builtin_state_dict("builtin:tiny-llama"))
    return model


LENGTHS = [1, 5, 16, 17, 40, 77, 130]


def test_builtin_matches_transformers(hf_tiny_llama: torch.nn.Module) -> None:
    prompts = mixed_prompts(256, LENGTHS)
    llm = LLM(kv_cache_memory_bytes=16 * 2**20)
    ours = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0,
                                                ignore_eos=True))
    assert [o.output_token_ids for o in ours] == hf_greedy(hf_tiny_llama, prompts, MAX_NEW)
    assert llm.ledger()["free"] == llm.ledger()["total"]


def test_builtin_matches_with_chunking_and_preemption(hf_tiny_llama: torch.nn.Module) -> None:
    prompts = mixed_prompts(256, LENGTHS, seed=1)
    # 24 blocks of 4 tokens: the batch cannot fit at once -> preemption; 32-token steps
    # split the long prompts into chunks.
    llm = LLM(num_gpu_blocks_override=48, block_size=4, max_num_batched_tokens=32,
              max_model_len=-1)
    preempted: list[str] = []
    original = llm.engine.scheduler._preempt

    def spy(req, out):  # type: ignore[no-untyped-def]
        preempted.append(req.request_id)
        original(req, out)

    llm.engine.scheduler._preempt = spy  # type: ignore[method-assign]
    ours = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0,
                                                ignore_eos=True))
    assert preempted, "the KV budget was meant to force preemption"
    assert [o.output_token_ids for o in ours] == hf_greedy(hf_tiny_llama, prompts, MAX_NEW)
    assert llm.ledger()["free"] == 48


TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 300,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    "attention_bias": False, "torch_dtype": "float32",
}


def test_tiny_qwen3_from_sharded_safetensors(tmp_path: object) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    fields: dict[str, Any] = {k: v for k, v in TINY_QWEN3.items() if k != "model_type"}
    cfg = Qwen3Config(**fields)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # spread logits so greedy has no near-ties
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    path = str(tmp_path)
    model.save_pretrained(path, max_shard_size="100KB")
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen3"
    prompts = mixed_prompts(300, [3, 16, 33, 50], seed=2)
    llm = LLM(path, kv_cache_memory_bytes=4 * 2**20, max_num_batched_tokens=24)
    ours = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0,
                                                ignore_eos=True))
    assert [o.output_token_ids for o in ours] == hf_greedy(model, prompts, MAX_NEW)


def test_seeded_sampling_is_reproducible() -> None:
    llm = LLM(kv_cache_memory_bytes=8 * 2**20)
    prompts = mixed_prompts(256, [5, 9, 13])
    sp = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=123,
                        ignore_eos=True)
    a = [o.output_token_ids for o in llm.generate(prompts, sp)]
    b = [o.output_token_ids for o in llm.generate(list(reversed(prompts)), sp)]
    assert a == list(reversed(b))
    greedy = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    top1 = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=1.0, top_k=1,
                                                ignore_eos=True))
    assert [o.output_token_ids for o in greedy] == [o.output_token_ids for o in top1]
