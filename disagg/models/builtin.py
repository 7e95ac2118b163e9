"""Small models whose weights come from a fixed seed (no download): ``builtin:tiny-llama``, and
``builtin:tiny-moe`` (Qwen3-MoE-shaped: 8 experts, top-2, a dense first layer)."""

from __future__ import annotations

from typing import Any

import torch

from disagg.common.tokenizer import BUILTIN_BOS_ID, BUILTIN_EOS_ID, BUILTIN_VOCAB_SIZE

_TINY: dict[str, Any] = {
    "vocab_size": BUILTIN_VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": BUILTIN_BOS_ID,
    "eos_token_id": BUILTIN_EOS_ID,
    "torch_dtype": "float32",
}

BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **_TINY},
    "tiny-moe": {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], **_TINY,
                 "moe_intermediate_size": 96, "num_experts": 8, "num_experts_per_tok": 2,
                 "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [0]},
}


def builtin_hf_config(model: str) -> dict[str, Any]:
    """The config.json dict of a builtin model name (``builtin:tiny-llama``)."""
    key = model.removeprefix("builtin:")
    if key not in BUILTIN_MODELS:
        raise KeyError(f"unknown builtin model {model!r}; available: "
                       + ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS))
    return dict(BUILTIN_MODELS[key])


def seeded_hf_state_dict(seed: int,
                         hf_names: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Deterministic weights for every Hugging Face-named shape, generated on CPU in fp32.

    The scale keeps activations O(1) and logits well spread, so greedy decoding has no near-ties
    and two implementations agree token for token.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(hf_names):
        shape = hf_names[name]
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            out[name] = 0.02 * torch.randn(shape, generator=gen)
        elif "embed_tokens" in name:
            out[name] = torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1]
            gain = 4.0 if "lm_head" in name else 1.0
            out[name] = gain * torch.randn(shape, generator=gen) / fan_in ** 0.5
    head = out.get("lm_head.weight")
    if head is not None and head.shape[0] > 127:
        # Damp rows of non-printable bytes and specials so a demo prints readable characters.
        damp = torch.full((head.shape[0], 1), 0.3)
        damp[32:127] = 1.0
        damp[10] = 1.0
        head.mul_(damp)
    return out
