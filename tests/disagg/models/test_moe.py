"""Mixture-of-experts models equal Hugging Face transformers: whole Mixtral, Qwen2-MoE and
Qwen3-MoE checkpoints token for token (greedy, fp32, CPU), DeepSeek-V2/V3 MoE blocks (shared
experts, grouped top-k, bias-corrected sigmoid routing) layer for layer under standard
attention (whole DeepSeek models with their latent attention: test_mla.py)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import torch

from disagg.common.config import ConfigError, ModelConfig
from disagg.common.sampling_params import SamplingParams
from disagg.llm import LLM
from disagg.models.arch import arch_from_hf_dict, moe_arch_from_hf_dict
from disagg.models.builtin import builtin_hf_config
from disagg.models.llama import LlamaForCausalLM
from disagg.models.loader import builtin_state_dict, load_model
from disagg.models.moe import SparseMoeBlock, select_experts
from disagg.models.ops import select_ops
from disagg.models.parallel import check_tp
from tests.disagg.models.hf_reference import MAX_NEW, hf_greedy, mixed_prompts

COMMON: dict[str, Any] = {
    "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {**COMMON, "intermediate_size": 48, "num_local_experts": 5,
                "num_experts_per_tok": 2},
    # a dense layer (mlp_only_layers) between MoE layers, a gated shared expert, no renorm
    "qwen2_moe": {**COMMON, "intermediate_size": 80, "moe_intermediate_size": 24,
                  "shared_expert_intermediate_size": 40, "num_experts": 6,
                  "num_experts_per_tok": 3, "norm_topk_prob": False, "mlp_only_layers": [1],
                  "decoder_sparse_step": 1},
    # every other layer sparse, renormalized top-k, qk-norm attention
    "qwen3_moe": {**COMMON, "intermediate_size": 80, "moe_intermediate_size": 24,
                  "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
                  "decoder_sparse_step": 2, "mlp_only_layers": []},
}


def _hf_model(model_type: str) -> Any:
    import transformers

    classes = {"mixtral": ("MixtralConfig", "MixtralForCausalLM"),
               "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
               "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}
    cfg_cls, model_cls = (getattr(transformers, n) for n in classes[model_type])
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**CONFIGS[model_type])).eval()
    with torch.no_grad():  # spread logits and routing so greedy and top-k have no near-ties
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.05)
            else:
                p.normal_(0, 0.3)  # routers too: top-k weights far from one-hot
    return model


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_moe_checkpoint_matches_transformers(model_type: str, tmp_path: Any) -> None:
    hf = _hf_model(model_type)
    path = str(tmp_path)
    hf.save_pretrained(path, max_shard_size="200KB")  # per-expert names, several shards
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    prompts = mixed_prompts(300, [1, 7, 16, 33, 61], seed=3)
    llm = LLM(path, kv_cache_memory_bytes=4 * 2**20, max_num_batched_tokens=24)
    arch = llm.engine.runner.model.arch  # type: ignore[attr-defined]
    assert arch.moe is not None and arch.moe.layers == {
        "mixtral": (0, 1, 2), "qwen2_moe": (0, 2), "qwen3_moe": (1,)}[model_type]
    ours = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0,
                                                ignore_eos=True))
    assert [o.output_token_ids for o in ours] == hf_greedy(hf, prompts, MAX_NEW)
    assert llm.ledger()["free"] == llm.ledger()["total"]


def test_builtin_tiny_moe_matches_transformers(tmp_path: Any) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    path = str(tmp_path)
    cfg = builtin_hf_config("builtin:tiny-moe")
    import json

    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(builtin_state_dict("builtin:tiny-moe"), os.path.join(path, "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = mixed_prompts(256, [2, 19, 40], seed=4)
    llm = LLM("builtin:tiny-moe", kv_cache_memory_bytes=8 * 2**20)
    ours = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0,
                                                ignore_eos=True))
    assert [o.output_token_ids for o in ours] == hf_greedy(hf, prompts, MAX_NEW)


DEEPSEEK: dict[str, dict[str, Any]] = {
    # V2: softmax, top-3 within the 2 best of 4 groups (group score = its best expert)
    "deepseek_v2": {"n_routed_experts": 8, "num_experts_per_tok": 3, "n_shared_experts": 2,
                    "moe_intermediate_size": 24, "topk_method": "group_limited_greedy",
                    "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.5,
                    "first_k_dense_replace": 1, "norm_topk_prob": False},
    # V3: sigmoid + correction bias, groups scored by their top-2, renormalized, scaled
    "deepseek_v3": {"n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1,
                    "moe_intermediate_size": 24, "n_group": 4, "topk_group": 2,
                    "routed_scaling_factor": 2.5, "first_k_dense_replace": 2,
                    "norm_topk_prob": True},
}


@pytest.mark.parametrize("model_type", sorted(DEEPSEEK))
def test_deepseek_moe_block_matches_transformers(model_type: str) -> None:
    import transformers

    v3 = model_type == "deepseek_v3"
    cfg_cls: Any = transformers.DeepseekV3Config if v3 else transformers.DeepseekV2Config
    hf_cfg = cfg_cls(hidden_size=64, intermediate_size=80, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=300,
                     **DEEPSEEK[model_type])
    block_cls: Any = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE if v3 \
        else transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe
    torch.manual_seed(1)
    hf_block = block_cls(hf_cfg).eval()
    with torch.no_grad():
        for p in hf_block.parameters():
            p.normal_(0, 0.3)
        if v3:
            hf_block.gate.e_score_correction_bias.normal_(0, 0.2)
    moe = moe_arch_from_hf_dict(hf_cfg.to_dict())
    assert moe is not None
    assert moe.layers == ((2, 3) if v3 else (1, 2, 3))  # first_k_dense_replace
    assert arch_from_hf_dict(hf_cfg.to_dict()).moe == moe  # whole models: test_mla.py
    # Our model with this MoE config under standard attention; load the HF block's tensors
    # into its layer under their checkpoint names (per-expert, shared_experts, gate bias).
    arch = dataclasses.replace(arch_from_hf_dict(CONFIGS["qwen3_moe"] | {"model_type": "llama",
                                                                          "hidden_size": 64}),
                               moe=moe, num_layers=4)
    ours = LlamaForCausalLM(arch, select_ops("cpu"), 64).eval()
    layer = moe.layers[0]
    hf_names = {f"model.layers.{layer}.mlp.{n}": t for n, t in _checkpoint_names(hf_block)}
    loaded = ours.load_weights(hf_names.items())
    block = ours.layers[layer].mlp
    assert isinstance(block, SparseMoeBlock) and len(loaded) == len(hf_names)
    x = torch.randn(37, 64)
    with torch.no_grad():
        expected = hf_block(x.unsqueeze(0)).squeeze(0)
        got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _checkpoint_names(hf_block: Any) -> list[tuple[str, torch.Tensor]]:
    """The block's tensors as a DeepSeek checkpoint names them (per-expert tensors)."""
    out = []
    for name, t in hf_block.state_dict().items():
        if name == "experts.gate_up_proj":
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out += [(f"experts.{e}.gate_proj.weight", t[e, :inter]),
                        (f"experts.{e}.up_proj.weight", t[e, inter:])]
        elif name == "experts.down_proj":
            out += [(f"experts.{e}.down_proj.weight", t[e]) for e in range(t.shape[0])]
        else:
            out.append((name, t))
    return out


def test_grouped_routing_keeps_to_the_best_groups() -> None:
    moe = moe_arch_from_hf_dict({"model_type": "deepseek_v3", "num_hidden_layers": 1,
                                 "n_routed_experts": 8, "num_experts_per_tok": 2,
                                 "moe_intermediate_size": 4, "n_group": 4, "topk_group": 1,
                                 "routed_scaling_factor": 1.0})
    assert moe is not None
    # group 3 (experts 6, 7) has the best top-2 sum although expert 0 scores highest alone
    logits = torch.tensor([[4.0, -9, -9, -9, -9, -9, 3.0, 3.0]])
    weights, ids = select_experts(logits, moe)
    assert sorted(ids[0].tolist()) == [6, 7]
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))  # renormalized
    bias = torch.zeros(8)
    bias[1] = bias[0] = 10.0  # the correction bias moves the choice, not the weights
    weights, ids = select_experts(logits, moe, bias)
    assert sorted(ids[0].tolist()) == [0, 1]
    s = torch.sigmoid(torch.tensor([4.0, -9.0]))
    torch.testing.assert_close(weights[0].sort().values, (s / s.sum()).sort().values)


def test_bad_moe_configs_are_clear_errors() -> None:
    base = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "moe_intermediate_size": 8}
    with pytest.raises(ConfigError, match="num_experts_per_tok 9"):
        moe_arch_from_hf_dict({**base, "num_experts": 4, "num_experts_per_tok": 9})
    with pytest.raises(ConfigError, match="lacks 'num_experts_per_tok'"):
        moe_arch_from_hf_dict({**base, "num_experts": 4})
    with pytest.raises(ConfigError, match="n_group 3"):
        moe_arch_from_hf_dict({"model_type": "deepseek_v3", "num_hidden_layers": 1,
                               "n_routed_experts": 8, "num_experts_per_tok": 2,
                               "moe_intermediate_size": 4, "n_group": 3, "topk_group": 1})
    arch = arch_from_hf_dict(builtin_hf_config("builtin:tiny-moe"))
    assert arch.moe is not None
    odd = dataclasses.replace(arch.moe, intermediate_size=90)
    with pytest.raises(ConfigError, match="moe_intermediate_size"):
        check_tp(dataclasses.replace(arch, moe=odd), 4)


def test_dummy_weights_for_an_moe_shape(tmp_path: Any) -> None:
    import json

    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump({**CONFIGS["qwen2_moe"], "model_type": "qwen2_moe"}, f)
    arch = arch_from_hf_dict({**CONFIGS["qwen2_moe"], "model_type": "qwen2_moe"})
    cfg = ModelConfig(model=str(tmp_path), served_model_name="m", load_format="dummy")
    model = load_model(cfg, arch, select_ops("cpu"), torch.device("cpu"), torch.float32, 64)
    block = model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock)
    w13 = block.experts.w13
    assert w13.shape == (6, 48, 64) and 0.05 < float(w13.detach().std()) < 0.25  # ~ 1 / sqrt(64)
