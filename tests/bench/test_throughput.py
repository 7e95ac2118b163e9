"""Offline throughput against a stand-in ``disagg.llm`` (the real engine is built elsewhere)."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest

from bench.throughput import main


@dataclass
class _Out:
    output_token_ids: list[int]


class _FakeLLM:
    """Records its construction and generates exactly max_tokens ids per sequence."""

    instances: list[_FakeLLM] = []

    def __init__(self, model: str, **kwargs) -> None:
        self.model, self.kwargs = model, kwargs
        self.calls: list[tuple[list[list[int]], list]] = []
        _FakeLLM.instances.append(self)

    def generate(self, prompt_token_ids, sampling_params):
        assert len(prompt_token_ids) == len(sampling_params)
        self.calls.append((prompt_token_ids, sampling_params))
        return [_Out([1] * sp.max_tokens) for sp in sampling_params]


@pytest.fixture
def fake_engine(monkeypatch):
    module = types.ModuleType("disagg.llm")
    module.LLM = _FakeLLM  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "disagg.llm", module)
    _FakeLLM.instances.clear()
    return _FakeLLM


def test_default_workload_is_nano_vllms(fake_engine, tmp_path, capsys):
    rows = tmp_path / "throughput.jsonl"
    assert main(["--model", "builtin:tiny", "--results-jsonl", str(rows)]) == 0
    llm = fake_engine.instances[0]
    assert llm.kwargs == {"load_format": "dummy"}  # only options that were set
    warmup, timed = llm.calls
    assert len(warmup[0]) == 1 and warmup[1][0].max_tokens == 16
    prompts, params = timed
    assert len(prompts) == 256
    assert all(100 <= len(p) <= 1024 for p in prompts)
    assert all(32 <= t < 127 for p in prompts for t in p)  # real byte tokens, no BOS/EOS
    assert all(100 <= sp.max_tokens <= 1024 and sp.min_tokens == sp.max_tokens
               and sp.ignore_eos for sp in params)
    row = json.loads(rows.read_text())
    assert row["kind"] == "throughput" and row["num_seqs"] == 256
    assert row["total_output_tokens"] == sum(sp.max_tokens for sp in params)
    assert row["total_input_tokens"] == sum(len(p) for p in prompts)
    assert row["output_throughput"] == pytest.approx(row["total_output_tokens"] / row["duration"])
    assert "output tok/s" in capsys.readouterr().out


def test_engine_options_are_passed_through(fake_engine, tmp_path):
    assert main(["--model", "m", "--num-seqs", "4", "--max-input-len", "120",
                 "--max-output-len", "110", "--device", "cpu", "--dtype", "float32",
                 "--max-num-seqs", "8", "--max-num-batched-tokens", "4096",
                 "--kv-cache-memory-bytes", "1000000", "--max-model-len", "2048",
                 "--load-format", "auto", "--num-warmups", "0", "--results-jsonl", ""]) == 0
    llm = fake_engine.instances[0]
    assert llm.kwargs == {"device": "cpu", "dtype": "float32", "max_num_seqs": 8,
                          "max_num_batched_tokens": 4096, "kv_cache_memory_bytes": 1000000,
                          "load_format": "auto", "max_model_len": 2048}
    assert len(llm.calls) == 1 and len(llm.calls[0][0]) == 4
    assert not (tmp_path / "throughput.jsonl").exists()


def test_engine_errors_and_bad_lengths_are_one_line(fake_engine, monkeypatch, capsys):
    assert main(["--model", "m", "--min-input-len", "50", "--max-input-len", "10"]) == 2
    assert "--min-input-len" in capsys.readouterr().err

    def broken(model, **kwargs):
        raise ValueError("no such model directory")

    monkeypatch.setattr(sys.modules["disagg.llm"], "LLM", broken)
    assert main(["--model", "nowhere", "--results-jsonl", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("disagg bench throughput: error: cannot build the engine for nowhere: "
                   "no such model directory")


def test_missing_engine_is_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "disagg.llm", None)
    assert main(["--model", "builtin:tiny"]) == 2
    assert "disagg.llm" in capsys.readouterr().err
