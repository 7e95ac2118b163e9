"""How many KV blocks fit, and which max_model_len follows (seed 001: the override counts).

    bytes_per_block = num_layers * 2 (K,V) * block_size * num_kv_heads * head_dim * dtype bytes
                    = the real stride of one block in the cache tensor (blocks outermost)
    dtype bytes     = the cache's element size: 1 with --kv-cache-dtype fp8 (twice the blocks
                      of a bf16 cache in the same memory), else the model dtype's

    available = N * bytes_per_block            if --num-gpu-blocks-override N
              = measured/explicit KV budget    otherwise
    num_blocks = available // bytes_per_block
    auto max_model_len = min(model limit, num_blocks * block_size)
"""

from __future__ import annotations

from dataclasses import dataclass

from disagg.common.config import ConfigError


@dataclass(frozen=True, slots=True)
class KVPlan:
    """Outcome of sizing: block count and the (possibly fitted) max_model_len."""

    num_blocks: int
    bytes_per_block: int
    max_model_len: int
    auto_fitted: bool


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype_bytes: int) -> int:
    """Per-block stride of the cache tensor across all layers, K and V."""
    return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype_bytes


def plan_kv_cache(*, available_bytes: int, block_bytes: int, block_size: int,
                  num_blocks_override: int | None, requested_max_model_len: int | None,
                  model_max_len: int) -> KVPlan:
    """Size the cache; raise ConfigError with the numbers when nothing sensible fits.

    requested_max_model_len: None = the model's own limit, -1 = auto-fit, N = exactly N.
    """
    if num_blocks_override is not None:
        if num_blocks_override < 1:
            raise ConfigError("--num-gpu-blocks-override must be at least 1")
        available_bytes = num_blocks_override * block_bytes
    num_blocks = max(available_bytes, 0) // block_bytes
    capacity_tokens = num_blocks * block_size
    if num_blocks == 0:
        raise ConfigError(
            f"no room for a single KV block: one block of {block_size} tokens needs "
            f"{block_bytes} bytes, only {max(available_bytes, 0)} bytes are available for the "
            "KV cache; raise --kv-cache-memory-bytes / --gpu-memory-utilization")
    if requested_max_model_len == -1:
        fitted = min(model_max_len, capacity_tokens)
        return KVPlan(num_blocks, block_bytes, fitted, fitted < model_max_len)
    want = model_max_len if requested_max_model_len is None else requested_max_model_len
    if requested_max_model_len is not None and want > model_max_len:
        raise ConfigError(f"--max-model-len {want} exceeds the model's limit "
                          f"max_position_embeddings={model_max_len}")
    if want > capacity_tokens:
        need_blocks = -(-want // block_size)
        raise ConfigError(
            f"max_model_len {want} needs {need_blocks * block_bytes} bytes of KV cache "
            f"({need_blocks} blocks of {block_bytes} bytes), but only "
            f"{num_blocks * block_bytes} bytes ({num_blocks} blocks) are available; "
            f"the largest max_model_len that fits is {capacity_tokens}: lower "
            "--max-model-len, use --max-model-len auto, or give the KV cache more memory")
    return KVPlan(num_blocks, block_bytes, want, False)
