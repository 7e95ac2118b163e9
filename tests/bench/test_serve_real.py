"""``disagg bench serve`` against a real ``disagg serve`` instance on CPU (builtin model)."""

from __future__ import annotations

import json

import pytest

from bench.datasets import DatasetConfig, sample_requests
from bench.serve import main
from disagg.common.tokenizer import get_tokenizer


@pytest.mark.slow  # an engine start-up costs ~20 s on the 2-core CI machine
def test_exact_lengths_against_a_real_instance(instance_factory, tmp_path):
    inst = instance_factory(["builtin:tiny-llama", "--device", "cpu"])
    rc = main(["--base-url", inst.url, "--model", "builtin:tiny-llama", "--num-prompts", "8",
               "--random-input-len", "40", "--random-output-len", "6", "--random-range-ratio",
               "0.5", "--max-concurrency", "4", "--disable-tqdm", "--save-result",
               "--result-dir", str(tmp_path), "--result-filename", "real.json",
               "--results-jsonl", ""])
    result = json.loads((tmp_path / "real.json").read_text())
    assert rc == 0 and result["completed"] == 8 and result["failed"] == 0
    # usage from the server equals what we asked for: ignore_eos + min_tokens hold the length
    assert result["total_output_tokens"] == sum(result["output_lens"])
    samples = sample_requests(DatasetConfig(num_prompts=8, random_input_len=40,
                                            random_output_len=6, random_range_ratio=0.5),
                              get_tokenizer("builtin:tiny-llama"))
    assert result["output_lens"] == [s.expected_output_len for s in samples]
    assert result["input_lens"] == [s.prompt_len for s in samples]
    assert all(len(itls) == n - 1 for itls, n in zip(result["itls"], result["output_lens"],
                                                     strict=True))
    assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0
