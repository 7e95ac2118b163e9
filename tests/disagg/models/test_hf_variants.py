"""Config variants real checkpoints ship, each saved by transformers and compared token for
token with its greedy output (fp32): biases on o_proj and the MLP, linear and dynamic rope
scaling, top-1 MoE routing that renormalizes, a Mistral config that names a bias its code
never builds. Variants the engine does not implement, and broken directories, are one
ConfigError naming the problem instead of a silent difference or a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from disagg.common.config import ConfigError
from disagg.common.sampling_params import SamplingParams
from disagg.llm import LLM
from tests.disagg.models.hf_reference import hf_greedy, mixed_prompts

BASE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False}
MOE = {"num_experts": 4, "moe_intermediate_size": 48, "num_experts_per_tok": 1,
       "norm_topk_prob": True}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-attention-and-mlp-bias": ("Llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen3-attention-bias": ("Qwen3", {"attention_bias": True, "head_dim": 32}),
    "llama-rope-linear": ("Llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-rope-dynamic": ("Llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    # no original_max_position_embeddings: transformers takes max_position_embeddings
    "llama-rope-llama3-no-original": ("Llama", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0}}),
    "llama-rope-yarn-no-original": ("Llama", {"rope_scaling": {"rope_type": "yarn",
                                                               "factor": 4.0}}),
    "mistral-bias-named-not-built": ("Mistral", {"attention_bias": True}),
    "mixtral-top1": ("Mixtral", {"num_local_experts": 4, "num_experts_per_tok": 1}),
    "qwen2-moe-top1-renormalized": ("Qwen2Moe", {**MOE, "shared_expert_intermediate_size": 0}),
    "qwen3-moe-top1-renormalized": ("Qwen3Moe", MOE),
}


def _save(kind: str, fields: dict[str, Any], path: Path) -> Any:
    """A random tiny ``kind`` model with spread weights (biases non-zero), saved to path."""
    import transformers

    config = getattr(transformers, f"{kind}Config")(**{**BASE, **fields})
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            else:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.5)
    model.save_pretrained(str(path))
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_transformers(variant: str, tmp_path: Path) -> None:
    kind, fields = VARIANTS[variant]
    model = _save(kind, fields, tmp_path)
    prompts = mixed_prompts(256, [1, 7, 33, 60], seed=3)
    assert _greedy(tmp_path, prompts, 8) == hf_greedy(model, prompts, 8)


def _greedy(path: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """disagg's greedy tokens for ``prompts`` from the checkpoint at ``path`` (fp32)."""
    llm = LLM(str(path), device="cpu", dtype="float32", kv_cache_memory_bytes=4 * 2**20)
    try:
        ours = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                    ignore_eos=True))
    finally:
        llm.close()
    return [o.output_token_ids for o in ours]


def test_a_qwen3_config_without_head_dim_takes_transformers_default(tmp_path: Path) -> None:
    """transformers' Qwen3 config defaults head_dim to 128 (not hidden_size / heads): a
    config.json without it is served with the checkpoint's 128-wide heads."""
    model = _save("Qwen3", {}, tmp_path)
    assert model.config.head_dim == 128 != BASE["hidden_size"] // BASE["num_attention_heads"]
    _edit_config(tmp_path, head_dim=None)
    prompts = mixed_prompts(256, [1, 7, 33], seed=3)
    assert _greedy(tmp_path, prompts, 6) == hf_greedy(model, prompts, 6)


def test_a_sharded_checkpoint_loads_only_the_shards_its_index_names(tmp_path: Path) -> None:
    """A stray *.safetensors beside an index's shards is not the checkpoint's (transformers
    ignores it); a shard the index names that is missing is one clear error."""
    from safetensors.torch import save_file

    model = _save("Llama", {}, tmp_path / "whole")
    model.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    save_file({"model.norm.weight": torch.zeros(int(BASE["hidden_size"]))},
              str(tmp_path / "zz-stray.safetensors"))
    prompts = mixed_prompts(256, [7, 20], seed=3)
    assert _greedy(tmp_path, prompts, 6) == hf_greedy(model, prompts, 6)
    next(p for p in sorted(tmp_path.glob("model-*.safetensors"))).unlink()
    with pytest.raises(ConfigError, match="which is not there"):
        LLM(str(tmp_path), device="cpu", dtype="float32", kv_cache_memory_bytes=4 * 2**20)


def _edit_config(path: Path, **changes: Any) -> None:
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))


def _truncate(path: Path) -> None:
    (weights,) = path.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-1000])


def _reshape_q(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    (weights,) = path.glob("*.safetensors")
    tensors = load_file(str(weights))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 8, tensors[name].shape[1])
    save_file(tensors, str(weights), metadata={"format": "pt"})


def _add_o_bias(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    (weights,) = path.glob("*.safetensors")
    tensors = load_file(str(weights))
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.ones(int(BASE["hidden_size"]))
    save_file(tensors, str(weights), metadata={"format": "pt"})


BROKEN: dict[str, tuple[Any, str]] = {
    "gelu-mlp": (lambda p: _edit_config(p, hidden_act="gelu"), "hidden_act 'gelu'"),
    "longrope": (lambda p: _edit_config(p, rope_scaling={"rope_type": "longrope",
                                                         "factor": 2.0}),
                 "rope_scaling type 'longrope'"),
    "rope-without-factor": (lambda p: _edit_config(p, rope_scaling={"rope_type": "linear"}),
                            "numeric factor"),
    "dynamic-past-its-original-length": (
        lambda p: _edit_config(p, rope_scaling={"rope_type": "dynamic", "factor": 2.0,
                                                "original_max_position_embeddings": 128}),
        "dynamic"),
    "kv-heads-not-dividing": (lambda p: _edit_config(p, num_key_value_heads=3),
                              "not a multiple of num_key_value_heads"),
    "missing-field": (lambda p: _edit_config(p, num_attention_heads=None),
                      "lacks 'num_attention_heads'"),
    "config-not-json": (lambda p: (p / "config.json").write_text("{\"model_type\": "),
                        "is not valid JSON"),
    "truncated-weights": (_truncate, "cannot read"),
    "weight-shape-off-the-config": (_reshape_q, "q_proj.weight has shape (72, 64)"),
    "a-bias-the-config-does-not-build": (_add_o_bias, "is a bias this model's config.json"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_what_cannot_be_served_exactly_is_one_clear_error(case: str, tmp_path: Path) -> None:
    _save("Llama", {}, tmp_path)
    breaks, message = BROKEN[case]
    breaks(tmp_path)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(str(tmp_path), device="cpu", dtype="float32", kv_cache_memory_bytes=4 * 2**20)
