"""FP8 weights: the quantizer's error, the e4m3fn -> e4m3fnuz conversion, fp8 checkpoints
(block-scaled and per-tensor; dense, MoE with fp8 routed experts, MLA; TP shards, EP ranks)
against the same model holding the dequantized weights, ``--quantization fp8`` against the
unquantized model, and the errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from disagg.cli import build_parser, engine_config_from_args
from disagg.common.config import ConfigError, ModelConfig
from disagg.models.arch import arch_from_hf_dict
from disagg.models.builtin import builtin_hf_config, seeded_hf_state_dict
from disagg.models.expert_parallel import EPContext
from disagg.models.layers import AttentionMetadata
from disagg.models.llama import LlamaForCausalLM
from disagg.models.loader import hf_param_shapes, load_model, resolve_arch
from disagg.models.ops import select_ops
from disagg.models.parallel import LinearBase, TPContext
from disagg.models.quant import (
    e4m3fn_to_fnuz,
    finalize_fp8_,
    fp8_expert_stacks,
    fp8_linears,
    prepare_fp8_,
    quantize_fp8,
)
from hip_kernels.fp8_gemm import dequantize_fp8, fp8_gemm_ref

OPS = select_ops("cpu")
CPU = torch.device("cpu")
BLOCK_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": [128, 128]}
TENSOR_CONFIG = {"quant_method": "fp8", "activation_scheme": "static"}
LLAMA: dict[str, Any] = {**builtin_hf_config("builtin:tiny-llama"), "hidden_size": 256,
                         "intermediate_size": 512, "num_hidden_layers": 2, "head_dim": 64}
"""q 256 rows, k and v 128: at TP 2 a rank's k and v (64 rows each) share a 128-row block, and
o_proj / down_proj split K on 128-column boundaries."""
MOE: dict[str, Any] = {**builtin_hf_config("builtin:tiny-moe"), "hidden_size": 256,
                       "intermediate_size": 512, "num_hidden_layers": 3, "head_dim": 64,
                       "moe_intermediate_size": 256}
"""tiny-moe (8 experts, top-2, a dense first layer, 2 MoE layers) with LLAMA's dense sizes and
256-row experts: gate and up are two 128-row scale blocks each, and TP 2 slices (128 rows)
fall on block boundaries."""
PROMPT = [5, 77, 200, 31, 9, 250, 3, 101, 17]
RELATIVE_ERROR = 0.05
"""||y_fp8 - y|| / ||y|| of 128 x 128 block (and per-tensor) fp8 weights on Gaussian ones."""
MODEL_RELATIVE_ERROR = 0.1
"""The same for the logits of tiny-llama (4 layers of fp8 projections; measured 0.063)."""
MOE_MODEL_RELATIVE_ERROR = 0.15
"""The same for tiny-moe: measured 0.098 with only its linears fp8, 0.070 with only its routed
experts, 0.100 with both (a perturbed router may pick other experts)."""


def sub(model: torch.nn.Module, path: str) -> Any:
    """A submodule, untyped (its attributes are the layer's own)."""
    return model.get_submodule(path)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(128, 128), None])
def test_reference_is_close_to_the_unquantized_matmul(dtype: torch.dtype, block: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 520, generator=gen) / 520 ** 0.5
    x = torch.randn(7, 520, generator=gen).to(dtype)
    q, scale = quantize_fp8(w, *(block or w.shape))
    assert q.dtype == torch.float8_e4m3fn
    assert scale.shape == ((3, 5) if block else (1, 1))
    exact = x.double() @ w.double().t()
    assert relative_error(fp8_gemm_ref(x, q, scale), exact) < RELATIVE_ERROR
    assert relative_error(dequantize_fp8(q, scale), w) < RELATIVE_ERROR


def test_quantized_blocks_reach_the_format_max() -> None:
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    for dtype, fmax in ((torch.float8_e4m3fn, 448.0), (torch.float8_e4m3fnuz, 240.0)):
        q, scale = quantize_fp8(w, 128, 128, dtype)
        assert q.dtype == dtype
        amax = q.float().abs().view(2, 128, 2, 128).amax(dim=(1, 3))
        assert torch.equal(amax, torch.full((2, 2), fmax))
    q, scale = quantize_fp8(torch.zeros(4, 8), 128, 128)
    assert torch.equal(scale, torch.ones(1, 1)) and not q.float().any()


def test_fnuz_conversion_keeps_every_value() -> None:
    bits = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    weight = bits.view(torch.float8_e4m3fn).view(1, -1)  # every finite e4m3fn value, -0 too
    for scale in (torch.tensor([[0.37]]), torch.tensor(1.5), torch.tensor([[0.25, 3.0]])):
        fnuz, fnuz_scale = e4m3fn_to_fnuz(weight, scale)
        assert fnuz.dtype == torch.float8_e4m3fnuz
        assert not torch.isnan(fnuz.float()).any()  # 0x80 (-0) is NaN in fnuz
        assert torch.equal(dequantize_fp8(fnuz, fnuz_scale), dequantize_fp8(weight, scale))


def fp8_checkpoint(hf_cfg: dict[str, Any], quant: dict[str, Any], seed: int = 0
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the fp8 checkpoint's tensors, the same model with those weights dequantized) of
    seeded weights: every projection fp8 (routed experts and kv_b_proj included, as DeepSeek
    ships them), embeddings, LM head, norms and routers not."""
    block = quant.get("weight_block_size")
    full = seeded_hf_state_dict(seed, hf_param_shapes(arch_from_hf_dict(hf_cfg)))
    fp8, dequantized = dict(full), dict(full)
    for name, w in full.items():
        if w.dim() != 2 or any(s in name for s in ("embed_tokens", "lm_head", "mlp.gate.",
                                                   "shared_expert_gate")):
            continue
        q, scale = quantize_fp8(w, *(block or w.shape))
        fp8[name] = q
        if block:
            fp8[name + "_scale_inv"] = scale
        else:
            fp8[name + "_scale"] = scale.reshape(())
        dequantized[name] = dequantize_fp8(q, scale)
    return fp8, dequantized


def save_checkpoint(path: Path, hf_cfg: dict[str, Any], quant: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> str:
    """A Hugging Face model directory: config.json with the quantization_config + one file."""
    (path / "config.json").write_text(json.dumps({**hf_cfg, "quantization_config": quant}))
    save_file(tensors, str(path / "model.safetensors"))
    return str(path)


def dequantized_model(hf_cfg: dict[str, Any], weights: dict[str, torch.Tensor],
                      tp: TPContext = TPContext()) -> LlamaForCausalLM:
    model = LlamaForCausalLM(arch_from_hf_dict(hf_cfg), OPS, 64, tp)
    model.load_weights(weights.items())
    return model.eval()


@torch.inference_mode()
def prefill_logits(model: LlamaForCausalLM, prompt: list[int] = PROMPT) -> torch.Tensor:
    """fp32 logits [len(prompt), vocab] of one prefill over a 4-token-block paged cache."""
    a, block_size = model.arch, 4
    num_blocks = -(-len(prompt) // block_size)
    cache = torch.zeros(num_blocks, a.num_layers, 2, block_size, model.num_local_kv_heads,
                        a.head_dim)
    attn = AttentionMetadata(
        slot_mapping=torch.arange(len(prompt)), block_tables=torch.arange(
            num_blocks, dtype=torch.int32)[None], seq_lens=torch.tensor([len(prompt)],
                                                                         dtype=torch.int32),
        query_start_loc=torch.tensor([0, len(prompt)], dtype=torch.int32), decode_only=False)
    hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), attn, cache)
    return model.compute_logits(hidden)


def assert_same_model(fp8_model: LlamaForCausalLM, reference: LlamaForCausalLM) -> None:
    """Logits equal up to fp32 rounding (the fp8 reference dequantizes exactly), so greedy
    picks the same tokens."""
    ours, ref = prefill_logits(fp8_model), prefill_logits(reference)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("quant", [BLOCK_CONFIG, TENSOR_CONFIG], ids=["block", "tensor"])
def test_fp8_checkpoint_equals_its_dequantized_weights(quant: dict[str, Any],
                                                       tmp_path: Path) -> None:
    fp8, dequantized = fp8_checkpoint(LLAMA, quant)
    path = save_checkpoint(tmp_path, LLAMA, quant, fp8)
    model = load_model(ModelConfig(model=path, served_model_name="m"), resolve_arch(path), OPS,
                       CPU, torch.float32, 64)
    layers = fp8_linears(model)
    assert len(layers) == 4 * LLAMA["num_hidden_layers"]
    assert all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)
    assert model.lm_head.weight.dtype == model.embed_tokens.weight.dtype == torch.float32
    assert_same_model(model, dequantized_model(LLAMA, dequantized))
    # q, k and v start on 128-row boundaries: their scales compact to one per 128 rows
    qkv = sub(model, "layers.0.self_attn.qkv_proj")
    assert qkv.weight_scale.shape == ((4, 2) if "weight_block_size" in quant else (4, 1))


@pytest.mark.parametrize("hf_cfg", [LLAMA, MOE], ids=["llama", "moe"])
def test_fnuz_model_gives_the_e4m3fn_logits(hf_cfg: dict[str, Any]) -> None:
    fp8, _ = fp8_checkpoint(hf_cfg, BLOCK_CONFIG)
    arch = arch_from_hf_dict({**hf_cfg, "quantization_config": BLOCK_CONFIG})
    logits = []
    for dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        model = LlamaForCausalLM(arch, OPS, 64)
        assert arch.quant is not None
        prepare_fp8_(model, arch.quant)
        model.load_weights(fp8.items())
        finalize_fp8_(model, OPS.fp8_gemm, dtype)
        assert all(layer.weight.dtype == dtype for layer in fp8_linears(model))
        assert all(e.w13.dtype == e.w2.dtype == dtype for e in fp8_expert_stacks(model))
        logits.append(prefill_logits(model.eval()))
    assert torch.equal(logits[0], logits[1])


def mla_config() -> dict[str, Any]:
    """test_mla's tiny DeepSeek-V3 (4 heads, latent 32 + 8, MoE after a dense layer)."""
    from tests.disagg.models.test_mla import CASES, COMMON

    model_type, extra = CASES["v3"]
    return {**COMMON, **extra, "model_type": model_type, "n_routed_experts": 4, "n_group": 2,
            "topk_group": 1, "moe_intermediate_size": 128}  # whole 128-row scale blocks


@pytest.mark.parametrize(("model", "quant"), [("llama", BLOCK_CONFIG), ("llama", TENSOR_CONFIG),
                                              ("mla", TENSOR_CONFIG)],
                         ids=["llama-block", "llama-tensor", "mla-tensor"])
def test_tp_shards_dequantize_to_the_shards_of_the_full_weights(model: str,
                                                                quant: dict[str, Any]) -> None:
    hf_cfg = LLAMA if model == "llama" else mla_config()
    fp8, dequantized = fp8_checkpoint(hf_cfg, quant)
    arch = arch_from_hf_dict({**hf_cfg, "quantization_config": quant})
    assert arch.quant is not None
    for rank in range(2):
        tp = TPContext(rank, 2)
        ours = LlamaForCausalLM(arch, OPS, 64, tp)
        prepare_fp8_(ours, arch.quant)
        ours.load_weights(fp8.items())
        finalize_fp8_(ours, OPS.fp8_gemm, torch.float8_e4m3fn)
        reference = dict(dequantized_model(hf_cfg, dequantized, tp).named_modules())
        if model == "llama":  # this rank's k and v (64 rows each) share a 128-row group
            qkv = sub(ours, "layers.0.self_attn.qkv_proj")
            assert qkv.weight_scale.shape == ((256, 2) if arch.quant.weight_block_size else
                                              (256, 1))
        for name, layer in ours.named_modules():
            if isinstance(layer, LinearBase):
                ref_weight = reference[name].weight
                assert torch.equal(dequantize_fp8(layer.weight, layer.weight_scale),
                                   ref_weight), (rank, name)


def test_tp_split_inside_a_scale_block_is_refused() -> None:
    cfg = {**builtin_hf_config("builtin:tiny-llama"), "quantization_config": BLOCK_CONFIG}
    arch = arch_from_hf_dict(cfg)  # o_proj's 128 input columns split 64 + 64 at TP 2
    assert arch.quant is not None
    model = LlamaForCausalLM(arch, OPS, 64, TPContext(0, 2))
    with pytest.raises(ConfigError, match="128-column scale blocks"):
        prepare_fp8_(model, arch.quant)


def load_saved(path: str, ep: EPContext = EPContext()) -> LlamaForCausalLM:
    """Load a saved checkpoint as the engine does (fp32 on CPU)."""
    return load_model(ModelConfig(model=path, served_model_name="m"), resolve_arch(path), OPS,
                      CPU, torch.float32, 64, ep=ep)


def load_checkpoint(path: Path, hf_cfg: dict[str, Any], quant: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """Save an fp8 checkpoint and load it."""
    return load_saved(save_checkpoint(path, hf_cfg, quant, tensors))


def dequantize_experts(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An fp8 stack [E, N, K] with its [E, Sn, Sk] scales, in fp32."""
    return torch.stack([dequantize_fp8(w, s) for w, s in zip(weight, scale)])


@pytest.mark.parametrize("quant", [BLOCK_CONFIG, TENSOR_CONFIG], ids=["block", "tensor"])
def test_moe_checkpoint_keeps_the_routed_experts_fp8(quant: dict[str, Any],
                                                     tmp_path: Path) -> None:
    fp8, dequantized = fp8_checkpoint(MOE, quant)
    assert fp8["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
    model = load_checkpoint(tmp_path, MOE, quant, fp8)
    stacks = fp8_expert_stacks(model)
    assert len(stacks) == 2
    assert all(e.w13.dtype == e.w2.dtype == torch.float8_e4m3fn for e in stacks)
    assert sub(model, "layers.1.mlp.gate").weight.dtype == torch.float32
    experts = sub(model, "layers.1.mlp.experts")
    # gate's two 128-row blocks, then up's (per-tensor: each half's scale on its blocks), over
    # H 256's two column blocks; w2: H's two row blocks over I 256's two column blocks
    block = "weight_block_size" in quant
    assert experts.w13_scale.shape == ((8, 4, 2) if block else (8, 4, 1))
    assert experts.w2_scale.shape == ((8, 2, 2) if block else (8, 1, 1))
    assert_same_model(model, dequantized_model(MOE, dequantized))


def test_per_tensor_experts_of_an_odd_size_share_one_scale(tmp_path: Path) -> None:
    cfg = builtin_hf_config("builtin:tiny-moe")  # I = 96: no 128-row layout splits gate / up
    fp8, dequantized = fp8_checkpoint(cfg, TENSOR_CONFIG)
    model = load_checkpoint(tmp_path, cfg, TENSOR_CONFIG, fp8)
    experts = sub(model, "layers.1.mlp.experts")
    assert experts.w13.dtype == torch.float8_e4m3fn and experts.w13_scale.shape == (8, 1, 1)
    reference = dequantized_model(cfg, dequantized)
    # the half with the smaller scale is requantized to the larger: one more fp8 rounding
    ours_w13 = dequantize_experts(experts.w13, experts.w13_scale)
    ref_w13 = sub(reference, "layers.1.mlp.experts").w13.detach()
    assert relative_error(ours_w13, ref_w13) < RELATIVE_ERROR
    assert relative_error(prefill_logits(model), prefill_logits(reference)) < RELATIVE_ERROR


@pytest.mark.parametrize(("hf_cfg", "tp_size", "match"), [
    (builtin_hf_config("builtin:tiny-moe"), 1, "moe_intermediate_size 96 is not a multiple"),
    (MOE, 4, "tensor_parallel_size 4 splits moe_intermediate_size 256 into 64-row expert "
             "slices"),
], ids=["tp1", "tp4"])
def test_block_scaled_experts_need_whole_scale_blocks(hf_cfg: dict[str, Any], tp_size: int,
                                                      match: str) -> None:
    arch = arch_from_hf_dict({**hf_cfg, "quantization_config": BLOCK_CONFIG})
    assert arch.quant is not None
    model = LlamaForCausalLM(arch, OPS, 64, TPContext(0, tp_size))
    with pytest.raises(ConfigError, match=match) as info:
        prepare_fp8_(model, arch.quant)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("quant", [BLOCK_CONFIG, TENSOR_CONFIG], ids=["block", "tensor"])
def test_tp_expert_slices_dequantize_to_the_slices_of_the_full_experts(
        quant: dict[str, Any]) -> None:
    fp8, dequantized = fp8_checkpoint(MOE, quant)
    arch = arch_from_hf_dict({**MOE, "quantization_config": quant})
    assert arch.quant is not None
    for rank in range(2):
        tp = TPContext(rank, 2)
        ours = LlamaForCausalLM(arch, OPS, 64, tp)
        prepare_fp8_(ours, arch.quant)
        ours.load_weights(fp8.items())
        finalize_fp8_(ours, OPS.fp8_gemm, torch.float8_e4m3fn)
        reference = dequantized_model(MOE, dequantized, tp)
        for layer in (1, 2):
            e, ref = (sub(m, f"layers.{layer}.mlp.experts") for m in (ours, reference))
            assert e.w13.shape == (8, 256, 256) and e.w2.shape == (8, 256, 128)
            assert torch.equal(dequantize_experts(e.w13, e.w13_scale), ref.w13), (rank, layer)
            assert torch.equal(dequantize_experts(e.w2, e.w2_scale), ref.w2), (rank, layer)


def test_expert_parallel_ranks_load_their_experts_with_their_scales(tmp_path: Path) -> None:
    fp8, _ = fp8_checkpoint(MOE, BLOCK_CONFIG)
    path = save_checkpoint(tmp_path, MOE, BLOCK_CONFIG, fp8)
    whole = load_saved(path)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    weights, local_ids = torch.rand(5, 2), torch.tensor([[0, 3], [1, 2], [3, 3], [2, 0], [1, 0]])
    for rank in range(2):
        ours = load_saved(path, EPContext(rank, 2))
        block, full = sub(ours, "layers.2.mlp"), sub(whole, "layers.2.mlp")
        held = slice(4 * rank, 4 * rank + 4)  # 8 experts over 2 ranks
        assert block.expert_start == 4 * rank and block.experts.w13.shape[0] == 4
        for name in ("w13", "w2", "w13_scale", "w2_scale"):
            mine, everyone = getattr(block.experts, name), getattr(full.experts, name)[held]
            assert torch.equal(mine.view(torch.uint8) if mine.dtype != torch.float32 else mine,
                               everyone.view(torch.uint8) if everyone.dtype != torch.float32
                               else everyone), (rank, name)
        gate = fp8[f"model.layers.2.mlp.experts.{4 * rank + 1}.gate_proj.weight_scale_inv"]
        assert torch.equal(block.experts.w13_scale[1, :2], gate)  # [2 row blocks, 2 col blocks]
        # what EPContext.run calls on this rank: its experts (ids local) with their scales
        torch.testing.assert_close(block._local_experts(x, weights, local_ids),
                                   full._local_experts(x, weights, local_ids + 4 * rank),
                                   rtol=0, atol=0)


def test_mla_checkpoint_keeps_kv_b_proj_dequantized(tmp_path: Path) -> None:
    cfg = mla_config()
    fp8, dequantized = fp8_checkpoint(cfg, BLOCK_CONFIG)
    path = save_checkpoint(tmp_path, cfg, BLOCK_CONFIG, fp8)
    model = load_model(ModelConfig(model=path, served_model_name="m"), resolve_arch(path), OPS,
                       CPU, torch.float32, 64)
    attn = sub(model, "layers.0.self_attn")
    assert attn.kv_b_proj.weight.dtype == torch.float32
    assert attn.q_a_proj.weight.dtype == attn.o_proj.weight.dtype == torch.float8_e4m3fn
    assert sub(model, "layers.1.mlp.experts").w13.dtype == torch.float8_e4m3fn
    assert_same_model(model, dequantized_model(cfg, dequantized))


def test_quantization_flag_stays_close_to_the_unquantized_model() -> None:
    arch = resolve_arch("builtin:tiny-llama")
    logits = {}
    for quantization in (None, "fp8"):
        cfg = ModelConfig(model="builtin:tiny-llama", served_model_name="m",
                          quantization=quantization)
        model = load_model(cfg, arch, OPS, CPU, torch.float32, 64)
        logits[quantization] = prefill_logits(model, list(range(3, 300, 7)))
    assert all(layer.weight.dtype == torch.float8_e4m3fn for layer in fp8_linears(model))
    assert model.lm_head.weight.dtype == torch.float32
    assert relative_error(logits["fp8"], logits[None]) < MODEL_RELATIVE_ERROR
    agree = (logits["fp8"].argmax(-1) == logits[None].argmax(-1)).float().mean()
    assert agree >= 0.85  # measured 40 of 43 positions


def test_quantization_flag_keeps_moe_experts_fp8_and_close() -> None:
    arch = resolve_arch("builtin:tiny-moe")
    logits, models = {}, {}
    for quantization in (None, "fp8"):
        cfg = ModelConfig(model="builtin:tiny-moe", served_model_name="m",
                          quantization=quantization)
        models[quantization] = load_model(cfg, arch, OPS, CPU, torch.float32, 64)
        logits[quantization] = prefill_logits(models[quantization], list(range(3, 300, 7)))
    experts, exact = (sub(models[q], "layers.1.mlp.experts") for q in ("fp8", None))
    assert experts.w13.dtype == experts.w2.dtype == torch.float8_e4m3fn
    # I = 96: w13 in [192, 128] blocks (one scale row: no 128-row block may hold gate and up
    # rows), w2 [128, 96] in one 128 x 128 block
    assert experts.w13_scale.shape == experts.w2_scale.shape == (8, 1, 1)
    for name in ("w13", "w2"):
        dequantized = dequantize_experts(getattr(experts, name), getattr(experts, f"{name}_scale"))
        assert relative_error(dequantized, getattr(exact, name).detach()) < RELATIVE_ERROR
    assert relative_error(logits["fp8"], logits[None]) < MOE_MODEL_RELATIVE_ERROR
    agree = (logits["fp8"].argmax(-1) == logits[None].argmax(-1)).float().mean()
    assert agree >= 0.85  # measured 39 of 43 positions


@pytest.mark.parametrize("quantization", [None, "fp8"])
@pytest.mark.parametrize("hf_cfg", [LLAMA, MOE], ids=["llama", "moe"])
def test_dummy_weights_quantize_at_load(quantization: str | None, hf_cfg: dict[str, Any],
                                        tmp_path: Path) -> None:
    quant = BLOCK_CONFIG if quantization is None else None
    cfg = {**hf_cfg, **({"quantization_config": quant} if quant else {})}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_model(ModelConfig(model=str(tmp_path), served_model_name="m",
                                   load_format="dummy", quantization=quantization),
                       resolve_arch(str(tmp_path)), OPS, CPU, torch.float32, 64)
    layers = fp8_linears(model)
    assert layers and all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)
    stacks = fp8_expert_stacks(model)
    assert all(e.w13.dtype == torch.float8_e4m3fn for e in stacks)
    if stacks:  # 128 x 128 blocks of each expert
        assert stacks[0].w13_scale is not None and stacks[0].w13_scale.shape == (8, 4, 2)
    assert torch.isfinite(prefill_logits(model)).all()


def test_unknown_quantization_is_one_line() -> None:
    with pytest.raises(ConfigError, match="--quantization 'int4' is not supported"):
        ModelConfig(model="builtin:tiny-llama", served_model_name="m", quantization="int4")
    args = build_parser().parse_args(["serve", "--quantization", "awq"])
    with pytest.raises(ConfigError) as info:
        engine_config_from_args(args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("quant", "match"), [
    ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "format 'e5m2'"),
    ({"quant_method": "fp8", "activation_scheme": "smooth"}, "activation_scheme"),
    ("fp8", "must be an object"),
])
def test_bad_quantization_config_is_a_config_error(quant: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        arch_from_hf_dict({**LLAMA, "quantization_config": quant})


@pytest.mark.parametrize(("hf_cfg", "deleted", "match"), [
    (LLAMA, "model.layers.0.mlp.down_proj.weight_scale_inv", "down_proj.weight_scale"),
    (MOE, "model.layers.2.mlp.experts.5.up_proj.weight_scale_inv",
     "layers.2.mlp.experts.w13_scale:expert:up:5"),
], ids=["dense", "expert"])
def test_fp8_weight_without_its_scale_is_a_config_error(hf_cfg: dict[str, Any], deleted: str,
                                                        match: str, tmp_path: Path) -> None:
    fp8, _ = fp8_checkpoint(hf_cfg, BLOCK_CONFIG)
    del fp8[deleted]
    path = save_checkpoint(tmp_path, hf_cfg, BLOCK_CONFIG, fp8)
    with pytest.raises(ConfigError, match=f"missing 1 weights.*{match}"):
        load_saved(path)


def test_unquantized_routed_experts_in_an_fp8_checkpoint_are_a_config_error(
        tmp_path: Path) -> None:
    fp8, dequantized = fp8_checkpoint(MOE, BLOCK_CONFIG)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    fp8[name] = dequantized[name]
    del fp8[name + "_scale_inv"]
    path = save_checkpoint(tmp_path, MOE, BLOCK_CONFIG, fp8)
    with pytest.raises(ConfigError, match="must quantize every routed expert"):
        load_saved(path)


def test_unquantized_layer_in_an_fp8_checkpoint_is_quantized_per_row(tmp_path: Path) -> None:
    fp8, dequantized = fp8_checkpoint(LLAMA, BLOCK_CONFIG)
    name = "model.layers.1.self_attn.o_proj.weight"
    del fp8[name + "_scale_inv"]
    fp8[name] = dequantized[name]  # left in fp32, as modules_to_not_convert would
    path = save_checkpoint(tmp_path, LLAMA, BLOCK_CONFIG, fp8)
    model = load_model(ModelConfig(model=path, served_model_name="m"), resolve_arch(path), OPS,
                       CPU, torch.float32, 64)
    o_proj = sub(model, "layers.1.self_attn.o_proj")
    assert o_proj.weight.dtype == torch.float8_e4m3fn
    assert relative_error(dequantize_fp8(o_proj.weight, o_proj.weight_scale),
                          dequantized[name]) < RELATIVE_ERROR


def test_llm_generates_with_fp8_weights() -> None:
    from disagg.common.sampling_params import SamplingParams
    from disagg.llm import LLM

    llm = LLM(quantization="fp8", kv_cache_memory_bytes=4 * 2**20, max_model_len=256)
    model = llm.engine.runner.model
    assert fp8_linears(model)[0].weight.dtype == torch.float8_e4m3fn
    out = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].output_token_ids) == 4
