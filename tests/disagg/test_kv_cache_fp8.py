"""--kv-cache-dtype fp8 in the engine (CPU, torch references): the flag, one byte per cached
element (so 4x the blocks of an fp32 cache in the same memory), the checkpoint's k_scale /
v_scale, and the logits.

Logit tolerances, stated:
  * exact plumbing: an fp8 cache gives the logits of an fp32 cache whose every written K/V
    value was rounded through e4m3 with the same scales, within 1e-4 (fp32 arithmetic);
  * precision: against an unrounded fp32 cache, |delta logit| <= 6% of max |logit| on
    tiny-llama (e4m3 keeps 3 mantissa bits: 2^-4 relative per element; measured 3.5%) and
    <= 15% on the tiny DeepSeek (MLA) config through two layers of latents (measured 8.9%);
    greedy picks agree on >= 90% of prompt positions and on the decode step.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from disagg.cli import build_parser, engine_config_from_args
from disagg.common import platform
from disagg.common.config import CacheConfig, ConfigError
from disagg.common.protocol import EngineCoreReadyResponse
from disagg.engine.kv_quant import apply_kv_scales, read_checkpoint_scales
from disagg.engine.model_runner import HostStep
from disagg.llm import LLM
from disagg.models.arch import arch_from_hf_dict
from disagg.models.builtin import seeded_hf_state_dict
from disagg.models.loader import hf_param_shapes
from hip_kernels.kv_fp8 import dequantize_ref, quantize_ref
from hip_kernels.reshape_and_cache import reshape_and_cache_ref
from hip_kernels.rotary_embedding import rotary_embedding_ref

PROMPT = [(7 * i + 3) % 250 + 1 for i in range(40)]
MLA_CONFIG: dict[str, Any] = {
    "model_type": "deepseek_v2", "vocab_size": 300, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "v_head_dim": 12, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "q_lora_rank": 24, "moe_intermediate_size": 24, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_routed_experts": 4,
    "topk_method": "greedy", "norm_topk_prob": False,
}
MLA_K_SCALES = (0.046875, 0.125)  # exact in fp32 (3/64)


def _llm(model: str, kv_cache_dtype: str = "auto") -> LLM:
    return LLM(model, device="cpu", kv_cache_memory_bytes=2 * 2**20, max_model_len=256,
               kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False)


def _mla_checkpoint(path: Path) -> str:
    """A tiny DeepSeek-V2 (MLA, one MoE layer) checkpoint with per-layer KV scales, written
    without transformers: seeded weights under the checkpoint's names, plus k_scale/v_scale
    (the v_scale an MLA cache must ignore: its latent is one tensor with one scale)."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps(MLA_CONFIG))
    arch = arch_from_hf_dict(MLA_CONFIG)
    weights = seeded_hf_state_dict(0, hf_param_shapes(arch))
    for layer, k_scale in enumerate(MLA_K_SCALES):
        weights[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(k_scale)
        weights[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(7.0)
    save_file(weights, str(path / "model.safetensors"))
    return str(path)


def _logits(llm: LLM, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every prompt position (one prefill step) and of one decode step after it,
    through the engine's own step function over the paged cache."""
    runner = llm.engine.runner
    n = len(prompt)
    table = np.arange(-(-(n + 1) // runner.block_size), dtype=np.int32)[None]
    pos = np.arange(n)
    prefill = runner.execute_step(HostStep(
        graph=False, ids=np.asarray(prompt), positions=pos, slots=pos.copy(),
        seq_lens=np.asarray([n], np.int32), table=table,
        query_start_loc=np.asarray([0, n], np.int32), sample_rows=list(range(n))))
    decode = runner.execute_step(HostStep(
        graph=False, ids=np.asarray(prompt[-1:]), positions=np.asarray([n]),
        slots=np.asarray([n]), seq_lens=np.asarray([n + 1], np.int32), table=table,
        query_start_loc=np.asarray([0, 1], np.int32), sample_rows=[0], decode_only=True))
    assert prefill is not None and decode is not None
    return prefill, decode


def _round_kv_writes_through_fp8(llm: LLM, like: LLM) -> None:
    """Make an fp32-cache engine write every K/V value as e4m3 would store it (with ``like``'s
    scales), so its logits are what an fp8 cache must give exactly."""
    fp8 = platform.fp8_dtype()

    def rounded_write(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
                      slots: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        k = dequantize_ref(quantize_ref(key, k_scale, fp8), k_scale, key.dtype)
        v = dequantize_ref(quantize_ref(value, v_scale, fp8), v_scale, value.dtype)
        reshape_and_cache_ref(k, v, kv_layer, slots)

    def rounded_rope_and_write(positions: torch.Tensor, q: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, cos_sin: torch.Tensor,
                               kv_layer: torch.Tensor, slots: torch.Tensor,
                               k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        q_rot, k_rot = rotary_embedding_ref(positions, q, key, cos_sin)
        rounded_write(k_rot, value, kv_layer, slots, k_scale, v_scale)
        return q_rot

    model = llm.engine.runner.model
    apply_kv_scales(model, like.engine.runner.kv_spec)
    for layer in model.layers:
        attn: Any = layer.self_attn
        attn.ops = dataclasses.replace(attn.ops, reshape_and_cache=rounded_write,
                                       rope_and_cache=rounded_rope_and_write)


def _check_logits(fp32: LLM, fp8: LLM, rounded: LLM, rel_tolerance: float) -> None:
    want_pre, want_dec = _logits(fp32, PROMPT)
    got_pre, got_dec = _logits(fp8, PROMPT)
    _round_kv_writes_through_fp8(rounded, fp8)
    exact_pre, exact_dec = _logits(rounded, PROMPT)
    torch.testing.assert_close(got_pre, exact_pre, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_dec, exact_dec, atol=1e-4, rtol=1e-4)
    for want, got in ((want_pre, got_pre), (want_dec, got_dec)):
        assert (got - want).abs().max() <= rel_tolerance * want.abs().max()
    assert (got_pre.argmax(-1) == want_pre.argmax(-1)).float().mean() >= 0.9
    assert got_dec.argmax(-1).tolist() == want_dec.argmax(-1).tolist()


def test_unknown_kv_cache_dtype_is_a_one_line_error():
    with pytest.raises(ConfigError, match="auto, fp8, fp8_e4m3") as err:
        CacheConfig(kv_cache_dtype="int8")
    assert "\n" not in str(err.value)
    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"])
    assert engine_config_from_args(args).cache.kv_cache_dtype == "fp8"
    with pytest.raises(ConfigError, match="--kv-cache-dtype 'fp4'"):
        engine_config_from_args(build_parser().parse_args(["serve", "--kv-cache-dtype", "fp4"]))


def test_fp8_cache_holds_one_byte_per_element_and_reports_its_dtype():
    fp32, fp8 = _llm("builtin:tiny-llama"), _llm("builtin:tiny-llama", "fp8")
    arch = fp8.engine.arch
    cache = fp8.engine.runner.kv_cache
    assert cache is not None  # CPU: the OCP format
    assert cache.dtype == platform.fp8_dtype() == torch.float8_e4m3fn
    assert fp8.engine.plan.bytes_per_block == (
        arch.num_layers * 2 * 16 * arch.num_kv_heads * arch.head_dim * 1)
    assert fp8.engine.plan.num_blocks == 4 * fp32.engine.plan.num_blocks
    ready = fp8.engine.ready_response()
    assert (ready.dtype, ready.kv_cache_dtype) == ("float32", "float8_e4m3fn")
    assert fp32.engine.ready_response().kv_cache_dtype == "float32"


def test_tiny_llama_fp8_logits_within_tolerance_of_fp32_kv():
    model = "builtin:tiny-llama"
    _check_logits(_llm(model), _llm(model, "fp8"), _llm(model), rel_tolerance=0.06)


def test_mla_fp8_logits_within_tolerance_with_checkpoint_scales(tmp_path: Path):
    path = _mla_checkpoint(tmp_path / "ds")
    fp8 = _llm(path, "fp8_e4m3")
    spec = fp8.engine.runner.kv_spec
    assert spec.k_scales == spec.v_scales == MLA_K_SCALES  # one latent, one scale per layer
    layers: Any = fp8.engine.runner.model.layers
    assert [layer.self_attn.k_scale for layer in layers] == list(MLA_K_SCALES)
    _check_logits(_llm(path), fp8, _llm(path), rel_tolerance=0.15)


def test_checkpoint_scales_are_read_by_name(tmp_path: Path):
    from safetensors.torch import save_file

    save_file({"model.layers.0.self_attn.k_scale": torch.tensor(0.5),
               "model.layers.0.self_attn.v_scale": torch.tensor([0.25]),
               "model.layers.2.self_attn.kv_scale": torch.tensor(2.0),
               "model.layers.1.mlp.down_proj.weight": torch.zeros(2, 2)},
              str(tmp_path / "a.safetensors"))
    assert read_checkpoint_scales(str(tmp_path), 3) == ((0.5, 1.0, 2.0), (0.25, 1.0, 2.0))
    assert read_checkpoint_scales("builtin:tiny-llama", 3) is None


def test_metrics_cache_dtype_is_the_kv_cache_dtype():
    from disagg.server.metrics import ServerMetrics
    from disagg.server.metrics_render import render_instance_metrics

    ready = EngineCoreReadyResponse(
        max_model_len=256, num_gpu_blocks=8, block_size=16, dtype="bfloat16", version="x",
        dp_rank=0, dp_size=1, max_num_seqs=4, max_num_batched_tokens=64, kv_role="kv_both",
        engine_id="e", device="cuda", model="m", kv_cache_dtype="float8_e4m3fnuz")
    synced = SimpleNamespace(max_model_len=256, num_gpu_blocks=8, block_size=16,
                             dtype="bfloat16", ready=(ready,))
    engine: Any = SimpleNamespace(synced=synced, stats={})
    text = render_instance_metrics(engine, ServerMetrics(), "m")
    assert 'cache_dtype="float8_e4m3fnuz"' in text
