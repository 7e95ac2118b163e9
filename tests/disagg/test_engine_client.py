"""Applying ready handshakes: min max_model_len, summed blocks, agreeing block_size."""

import pytest

from disagg.engine_client import EngineStartupError, apply_ready_responses
from disagg.protocol import EngineCoreReadyResponse


def ready(rank: int, max_len: int, blocks: int, block_size: int = 16) -> EngineCoreReadyResponse:
    return EngineCoreReadyResponse(
        max_model_len=max_len, num_gpu_blocks=blocks, block_size=block_size, dtype="float32",
        version="t", dp_rank=rank, dp_size=2, max_num_seqs=8, max_num_batched_tokens=64,
        kv_role="kv_both", engine_id=f"e{rank}", device="cpu", model="m")


def test_min_length_and_summed_blocks() -> None:
    synced = apply_ready_responses(None, [ready(1, 512, 10), ready(0, 2048, 30)])
    assert synced.max_model_len == 512
    assert synced.num_gpu_blocks == 40
    assert [r.dp_rank for r in synced.ready] == [0, 1]


def test_frontend_limit_counts_in_min() -> None:
    assert apply_ready_responses(256, [ready(0, 2048, 30)]).max_model_len == 256
    assert apply_ready_responses(-1, [ready(0, 2048, 30)]).max_model_len == 2048


def test_block_size_disagreement_is_startup_error() -> None:
    with pytest.raises(EngineStartupError, match="block_size"):
        apply_ready_responses(None, [ready(0, 64, 1, 16), ready(1, 64, 1, 32)])
