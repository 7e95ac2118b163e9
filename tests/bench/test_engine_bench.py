"""bench/engine_bench.py's cost model and flags (the GPU runs themselves are in
bench/results/engine.jsonl)."""

from __future__ import annotations

import argparse

from bench import engine_bench


def test_the_kv_roofline_follows_the_cache_dtype() -> None:
    bf16 = engine_bench._Cost("deepseek-v2-lite", 10**9)
    fp8 = engine_bench._Cost("deepseek-v2-lite", 10**9, kv_elt=1)
    layers = bf16.arch.num_layers
    assert bf16.kv_per_token == layers * 576 * 2  # one latent per token and layer
    assert fp8.kv_per_token == layers * 576
    assert fp8.decode_bytes(64, 1024) < bf16.decode_bytes(64, 1024)


def test_precision_names_what_is_fp8() -> None:
    def ns(q: str | None, kv: str) -> argparse.Namespace:
        return argparse.Namespace(quantization=q, kv_cache_dtype=kv)

    assert engine_bench._precision(ns(None, "auto")) == "bf16"
    assert engine_bench._precision(ns("fp8", "auto")) == "fp8 weights"
    assert engine_bench._precision(ns("fp8", "fp8")) == "fp8 weights + KV"
    assert engine_bench._precision(ns(None, "fp8")) == "fp8 KV"


def test_without_a_gpu_it_refuses_with_exit_2() -> None:
    assert engine_bench.main(["--quantization", "fp8"]) == 2
