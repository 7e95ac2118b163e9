"""config.json's sliding_window: refused at start with one line past the window (full attention
would differ), allowed up to it; Qwen2's switched-off window still loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from disagg.common.config import CacheConfig, ConfigError, EngineConfig, ModelConfig
from disagg.engine.engine_core import build_engine
from disagg.models.arch import arch_from_hf_dict, sliding_window_from_hf_dict

BASE: dict[str, Any] = {
    "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "float32"}
MISTRAL = {**BASE, "model_type": "mistral", "sliding_window": 64}
QWEN2 = {**BASE, "model_type": "qwen2", "sliding_window": 64, "use_sliding_window": False,
         "max_window_layers": 1}


def _engine(tmp_path: Path, config: dict[str, Any], max_model_len: int | None) -> Any:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return build_engine(EngineConfig(
        model=ModelConfig(model=str(tmp_path), served_model_name="m", device="cpu",
                          load_format="dummy", max_model_len=max_model_len),
        cache=CacheConfig(kv_cache_memory_bytes=2 * 2**20)))


@pytest.mark.parametrize(("config", "window"), [
    (MISTRAL, 64),
    ({**MISTRAL, "sliding_window": None}, None),  # Mistral v0.2+: null
    (QWEN2, None),
    ({**QWEN2, "use_sliding_window": True}, 64),
    ({**QWEN2, "use_sliding_window": True, "max_window_layers": 2}, None),  # no layer uses it
    ({**MISTRAL, "layer_types": ["full_attention"] * 2}, None),
])
def test_window_read_from_config(config: dict[str, Any], window: int | None) -> None:
    assert sliding_window_from_hf_dict(config) == window
    assert arch_from_hf_dict(config).sliding_window == window


@pytest.mark.parametrize("max_model_len", [None, 65])
def test_context_past_the_window_is_refused_in_one_line(tmp_path: Path,
                                                        max_model_len: int | None) -> None:
    with pytest.raises(ConfigError) as err:
        _engine(tmp_path, MISTRAL, max_model_len)
    message = str(err.value)
    assert "\n" not in message and "sliding_window=64" in message
    assert "not support" in message and "--max-model-len 64" in message


def test_context_within_the_window_loads(tmp_path: Path) -> None:
    engine = _engine(tmp_path, MISTRAL, 64)
    assert engine.max_model_len == 64
    engine.close()


def test_qwen2_with_the_window_switched_off_loads(tmp_path: Path) -> None:
    engine = _engine(tmp_path, QWEN2, None)
    assert engine.max_model_len == 512
    engine.close()
