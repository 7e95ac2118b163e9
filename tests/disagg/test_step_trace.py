"""DISAGG_STEP_TRACE_FILE: one JSON line per model step, appended, with wall-clock bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from disagg.common.sampling_params import SamplingParams
from disagg.llm import LLM


def test_each_model_step_appends_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    path = tmp_path / "steps.jsonl"
    path.write_text('{"earlier": true}\n')  # appended to, never truncated
    monkeypatch.setenv("DISAGG_STEP_TRACE_FILE", str(path))
    with LLM(device="cpu", kv_cache_memory_bytes=4 * 2**20, max_model_len=256,
             max_num_batched_tokens=16) as llm:
        llm.generate([list(range(1, 41))], SamplingParams(max_tokens=3, temperature=0.0,
                                                          ignore_eos=True))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"earlier": True}
    steps = lines[1:]
    # 40 prompt tokens in chunks of 16 (the third chunk samples the first token), then two
    # decode steps
    assert [s["tokens"] for s in steps] == [16, 16, 8, 1, 1]
    assert all(s["requests"] == 1 and s["end"] >= s["start"] for s in steps)
    assert all(a["end"] <= b["start"] for a, b in zip(steps, steps[1:]))


def test_no_file_without_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISAGG_STEP_TRACE_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    with LLM(device="cpu", kv_cache_memory_bytes=4 * 2**20, max_model_len=256) as llm:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0))
        assert llm.engine._trace is None
    assert list(tmp_path.iterdir()) == []
