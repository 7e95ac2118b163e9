"""KV sizing: override before auto-fit and checks (seed 001), errors with the numbers."""

import pytest

from disagg.common.config import ConfigError
from disagg.engine.kv_sizing import bytes_per_block, plan_kv_cache

BLOCK = bytes_per_block(4, 16, 2, 32, 4)


def test_bytes_per_block_is_full_stride() -> None:
    assert BLOCK == 4 * 2 * 16 * 2 * 32 * 4


def test_override_replaces_available_bytes_before_autofit() -> None:
    plan = plan_kv_cache(available_bytes=10**12, block_bytes=BLOCK, block_size=16,
                         num_blocks_override=8, requested_max_model_len=-1, model_max_len=4096)
    assert plan.num_blocks == 8
    assert plan.max_model_len == 8 * 16
    assert plan.auto_fitted


def test_autofit_keeps_model_limit_when_it_fits() -> None:
    plan = plan_kv_cache(available_bytes=1000 * BLOCK, block_bytes=BLOCK, block_size=16,
                         num_blocks_override=None, requested_max_model_len=-1,
                         model_max_len=4096)
    assert plan.max_model_len == 4096 and not plan.auto_fitted


def test_fixed_length_that_does_not_fit_names_the_numbers() -> None:
    with pytest.raises(ConfigError) as err:
        plan_kv_cache(available_bytes=0, block_bytes=BLOCK, block_size=16, num_blocks_override=4,
                      requested_max_model_len=1000, model_max_len=4096)
    msg = str(err.value)
    assert "1000" in msg and f"{63 * BLOCK}" in msg and f"{4 * BLOCK}" in msg
    assert "largest max_model_len that fits is 64" in msg


def test_no_room_for_one_block() -> None:
    with pytest.raises(ConfigError, match="no room for a single KV block"):
        plan_kv_cache(available_bytes=BLOCK - 1, block_bytes=BLOCK, block_size=16,
                      num_blocks_override=None, requested_max_model_len=-1, model_max_len=4096)


def test_length_over_model_limit_rejected() -> None:
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        plan_kv_cache(available_bytes=10**9, block_bytes=BLOCK, block_size=16,
                      num_blocks_override=None, requested_max_model_len=8192,
                      model_max_len=4096)
