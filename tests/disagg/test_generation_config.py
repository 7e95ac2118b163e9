"""generation_config.json as vLLM reads it: every EOS id stops (config.json's list too), and its
sampling defaults fill the fields a request omits (never the ones it gives)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from disagg.common.config import ConfigError
from disagg.common.generation_config import (
    SamplingDefaults,
    load_generation_config,
    parse_generation_config,
)
from disagg.common.sampling_params import SamplingParams
from disagg.llm import LLM
from disagg.server.api_server import ENGINE

TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
PROMPT = [(7 * i + 3) % 250 + 3 for i in range(12)]


def _model_dir(path: Path, config: dict[str, Any], generation: dict[str, Any] | None) -> str:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return str(path)


def _generate(model: str, ignore_eos: bool = False, **kw: Any) -> tuple[list[int], str | None]:
    llm = LLM(model, device="cpu", load_format="dummy", kv_cache_memory_bytes=2 * 2**20,
              max_model_len=128, enable_prefix_caching=False, **kw)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0,
                                                ignore_eos=ignore_eos))[0]
    return out.output_token_ids, out.finish_reason


def test_the_second_eos_id_of_either_file_stops_generation(tmp_path: Path) -> None:
    free, _ = _generate(_model_dir(tmp_path / "free", TINY_LLAMA, None), ignore_eos=True)
    # the first token that did not come out before: the run must stop right there
    k = next(i for i, t in enumerate(free) if t not in free[:i])
    stop = free[k]
    unused = next(t for t in range(3, 300) if t not in free)
    assert 2 not in free[:k + 1]
    gen_dir = _model_dir(tmp_path / "gen", TINY_LLAMA, {"eos_token_id": [unused, stop]})
    assert _generate(gen_dir) == (free[:k + 1], "stop")
    # --generation-config vllm drops the defaults only: the file's EOS ids still stop (vLLM)
    assert _generate(gen_dir, generation_config="vllm") == (free[:k + 1], "stop")
    cfg_dir = _model_dir(tmp_path / "cfg", {**TINY_LLAMA, "eos_token_id": [unused, stop]}, None)
    assert _generate(cfg_dir) == (free[:k + 1], "stop")
    assert _generate(gen_dir, ignore_eos=True) == (free, "length")


def test_defaults_parse_like_vllm() -> None:
    gen = parse_generation_config({"eos_token_id": 7, "temperature": 0.6, "top_p": 0.9,
                                   "top_k": 20, "max_new_tokens": 64, "do_sample": True,
                                   "repetition_penalty": 1.05, "min_p": 0.05})
    assert gen.eos_token_ids == (7,)
    assert gen.defaults == SamplingDefaults(temperature=0.6, top_p=0.9, top_k=20, max_tokens=64,
                                            repetition_penalty=1.05, min_p=0.05)
    assert gen.ignored == ()
    # transformers' own defaults ask for nothing (GenerationConfig.to_diff_dict)
    plain = parse_generation_config({"temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                     "repetition_penalty": 1.0})
    assert plain.defaults == SamplingDefaults() and plain.ignored == ()
    for bad in ({"eos_token_id": "x"}, {"top_p": 0}, {"temperature": -1}, {"min_p": 2},
                {"repetition_penalty": 0}, [1]):
        with pytest.raises(ConfigError):
            parse_generation_config(bad)


def test_modes_and_paths(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "m", TINY_LLAMA, {"eos_token_id": [2, 9], "temperature": 0.5})
    assert load_generation_config(model).defaults.temperature == 0.5
    vllm = load_generation_config(model, "vllm")
    assert vllm.eos_token_ids == (2, 9) and vllm.defaults == SamplingDefaults()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"top_k": 5}))
    assert load_generation_config(model, str(other)).defaults.top_k == 5
    assert load_generation_config("builtin:tiny-llama").defaults == SamplingDefaults()
    with pytest.raises(ConfigError, match="--generation-config"):
        load_generation_config(model, str(tmp_path / "missing"))


@pytest.mark.parametrize(("body", "expected"), [
    ({}, (0.6, 0.9, 20)),
    ({"temperature": 0, "top_p": 1.0, "top_k": -1}, (0.0, 1.0, 0)),
    ({"temperature": 1.2}, (1.2, 0.9, 20)),
])
async def test_defaults_fill_only_omitted_fields(instance_client: Any, body: dict[str, Any],
                                                 expected: tuple[float, float, int]) -> None:
    defaults = SamplingDefaults(temperature=0.6, top_p=0.9, top_k=20, max_tokens=2,
                                repetition_penalty=1.1, min_p=0.02)
    client = await instance_client(sampling_defaults=defaults)
    resp = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], **body})
    assert resp.status == 200, await resp.text()
    sp = client.server.app[ENGINE].requests[-1].sampling_params
    assert (sp.temperature, sp.top_p, sp.top_k) == expected
    assert (sp.repetition_penalty, sp.min_p) == (1.1, 0.02)
    assert sp.max_tokens == 2  # max_new_tokens, since the request gave no max_tokens
    resp = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
    assert resp.status == 200  # max_new_tokens caps a client's max_tokens too (as vLLM)
    assert client.server.app[ENGINE].requests[-1].sampling_params.max_tokens == 2
    resp = await client.post("/v1/completions", json={"prompt": "hi"})  # the default 16
    assert client.server.app[ENGINE].requests[-1].sampling_params.max_tokens == 2
