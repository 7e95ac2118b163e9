"""DeepSeek-V2/V3 latent attention (MLA) equals transformers token for token (greedy, fp32, CPU):
with and without the q bottleneck, interleaved and half-split rotary, YaRN scaling, dense and
MoE layers; the cache holds one latent per token and layer, and nothing else."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from disagg.common.config import ConfigError
from disagg.common.sampling_params import SamplingParams
from disagg.llm import LLM
from disagg.models.arch import arch_from_hf_dict
from disagg.models.parallel import check_tp
from tests.disagg.models.hf_reference import MAX_NEW, hf_greedy, mixed_prompts

COMMON: dict[str, Any] = {
    "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "moe_intermediate_size": 24,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # V2-Lite-like: no q bottleneck, interleaved rotary, greedy routing, YaRN
    "v2-lite": ("deepseek_v2", {"q_lora_rank": None, "n_routed_experts": 4,
                                "topk_method": "greedy", "norm_topk_prob": False,
                                "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                                                    "factor": 4.0,
                                                    "original_max_position_embeddings": 128,
                                                    "mscale": 0.707, "mscale_all_dim": 0.707,
                                                    "beta_fast": 32, "beta_slow": 1}}),
    # V2 with the q bottleneck and group-limited routing, default rotary
    "v2": ("deepseek_v2", {"q_lora_rank": 24, "n_routed_experts": 8,
                           "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                           "norm_topk_prob": False}),
    # V3: sigmoid routing with the correction bias, half-split rotary
    "v3": ("deepseek_v3", {"q_lora_rank": 24, "n_routed_experts": 8, "n_group": 4,
                           "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.0,
                           "rope_interleave": False}),
    # an rms_norm_eps far from 1e-6: the latent norms keep 1e-6 (DeepSeek's code and
    # transformers hard-code it), the layer norms take it
    "v3-rms-eps-1e-2": ("deepseek_v3", {"q_lora_rank": 24, "n_routed_experts": 8, "n_group": 4,
                                        "topk_group": 2, "norm_topk_prob": True,
                                        "rms_norm_eps": 1e-2}),
}


SMALL_LATENTS = {"v3-rms-eps-1e-2"}


def _hf_model(case: str) -> Any:
    import transformers

    model_type, extra = CASES[case]
    cfg_cls: Any = transformers.DeepseekV3Config if model_type == "deepseek_v3" \
        else transformers.DeepseekV2Config
    model_cls: Any = transformers.DeepseekV3ForCausalLM if model_type == "deepseek_v3" \
        else transformers.DeepseekV2ForCausalLM
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**COMMON, **extra})).eval()
    with torch.no_grad():  # spread logits and routing so greedy and top-k have no near-ties
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.05)
            else:
                p.normal_(0, 0.3)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
        if case in SMALL_LATENTS:  # latents of rms ~0.1: the norms' eps decides the output
            for name, p in model.named_parameters():
                if name.endswith(("q_a_proj.weight", "kv_a_proj_with_mqa.weight")):
                    p.mul_(0.02)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_mla_checkpoint_matches_transformers(case: str, tmp_path: Any) -> None:
    hf = _hf_model(case)
    path = str(tmp_path)
    hf.save_pretrained(path)
    assert any(f.endswith(".safetensors") for f in os.listdir(path))
    prompts = mixed_prompts(300, [1, 5, 16, 17, 40], seed=5)
    # blocks of 8 and 24-token steps: latents span blocks and prompts are chunked
    llm = LLM(path, kv_cache_memory_bytes=2 * 2**20, max_num_batched_tokens=24, block_size=8)
    arch = llm.engine.runner.model.arch  # type: ignore[attr-defined]
    assert arch.mla is not None and (arch.num_kv_heads, arch.head_dim) == (1, 20)  # 40 / 2
    ours = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0,
                                                ignore_eos=True))
    assert [o.output_token_ids for o in ours] == hf_greedy(hf, prompts, MAX_NEW)
    assert llm.ledger()["free"] == llm.ledger()["total"]


def test_the_cache_holds_one_latent_per_token_and_layer() -> None:
    model_type, extra = CASES["v2"]
    arch = arch_from_hf_dict({**COMMON, **extra, "model_type": model_type})
    assert arch.mla is not None and arch.mla.latent_dim == 40
    assert arch.kv_bytes_per_token_per_elt == 3 * 40  # layers x latent, no per-head K or V
    check_tp(arch, 2)  # the 4 heads split; the latent is replicated
    with pytest.raises(ConfigError, match="num_attention_heads"):
        check_tp(arch, 3)


@pytest.mark.parametrize("case", [
    "v2-lite",
    # v2 (the q bottleneck split) at TP 2 equals TP 1 in the default
    # test_pd_moves_exactly_the_latents_and_equals_monolithic (a TP 2 prefill and decode)
    pytest.param("v2", marks=pytest.mark.slow)])
def test_tensor_parallel_2_gives_the_tp_1_tokens(case: str, tmp_path: Any) -> None:
    """Heads split over 2 gloo ranks (q or q_b, kv_b rows, o_proj columns), the latent
    replicated: greedy tokens equal TP 1 through chunked prefill and absorbed decode."""
    path = str(tmp_path)
    _hf_model(case).save_pretrained(path)
    prompts = mixed_prompts(300, [1, 16, 17, 40], seed=6)
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    out = {}
    for tp in (1, 2):
        with LLM(path, kv_cache_memory_bytes=2 * 2**20, max_num_batched_tokens=24,
                 block_size=8, tensor_parallel_size=tp) as llm:
            out[tp] = [o.output_token_ids for o in llm.generate(prompts, greedy)]
            assert llm.ledger()["free"] == llm.ledger()["total"]
    assert out[2] == out[1]


def test_pd_moves_exactly_the_latents_and_equals_monolithic(instance_factory: Any,
                                                            tmp_path: Any) -> None:
    """A TP 2 prefill serves a TP 1 and a TP 2 decode (READ): both equal monolithic (a TP 1
    engine in this process); each receiving rank gets every token's whole latent exactly once
    (never split, never twice)."""
    import asyncio

    import aiohttp

    from tests.connectors.pd_helpers import (
        info,
        kv_config,
        pd_request,
        settled_metric,
        wait_clean,
    )

    path = str(tmp_path / "v2")
    _hf_model("v2").save_pretrained(path)
    base = [path, "--device", "cpu", "--kv-cache-memory-bytes", "4MiB", "--block-size", "16"]
    prefill, decode1, decode2 = instance_factory.many(
        [*base, "-tp", "2", "--kv-transfer-config", kv_config("kv_producer", "read")],
        [*base, "--kv-transfer-config", kv_config("kv_consumer", "read")],
        [*base, "-tp", "2", "--kv-transfer-config", kv_config("kv_consumer", "read")],
        ready_timeout_s=120)
    prompts = [[(5 * i + n) % 290 + 3 for i in range(n)] for n in (2, 17, 33, 50)]
    with LLM(path, device="cpu", kv_cache_memory_bytes=4 * 2**20, block_size=16) as mono:
        want = [o.output_token_ids for o in mono.generate(prompts, SamplingParams(
            max_tokens=6, temperature=0, ignore_eos=True))]

    async def go() -> dict[str, list[list[int]]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            def body(p: list[int]) -> dict[str, Any]:
                return {"prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True}

            got: dict[str, list[list[int]]] = {decode1.url: [], decode2.url: []}
            for p in prompts:
                for d in (decode1, decode2):
                    status, res = await pd_request(s, prefill.url, d.url, body(p), "read",
                                                   info(prefill.url), info(d.url))
                    assert status == 200, res
                    got[d.url].append(res["choices"][0]["token_ids"])
            return got

    got = asyncio.run(go())
    assert got == {decode1.url: want, decode2.url: want}
    blocks = sum(-(-(len(p) - 1) // 16) for p in prompts)
    latent_bytes = 3 * 16 * 40 * 4  # layers x block tokens x latent x fp32, per block
    for d, ranks in ((decode1, 1), (decode2, 2)):
        moved = settled_metric(d.url, "disagg_kv_connector_bytes_moved_total",
                               ranks * blocks * latent_bytes)
        assert moved == ranks * blocks * latent_bytes, d.url
    for inst in (prefill, decode1, decode2):
        wait_clean(inst.url)


@pytest.mark.parametrize("keys", [{"scoring_func": "softmax"}, {"topk_method": "greedy"}])
def test_deepseek_v3_routing_other_than_its_own_is_refused(keys: dict[str, str]) -> None:
    """DeepSeek-V3's code routes with sigmoid scores and noaux_tc only (transformers ignores
    these keys): another value is refused, not served as something neither runs."""
    from disagg.common.config import ConfigError
    from disagg.models.arch import arch_from_hf_dict

    cfg = {**COMMON, **CASES["v3"][1], "model_type": "deepseek_v3", **keys}
    with pytest.raises(ConfigError, match="sigmoid and noaux_tc"):
        arch_from_hf_dict(cfg)
    arch_from_hf_dict({**COMMON, **CASES["v3"][1], "model_type": "deepseek_v3"})
