"""What the P/D connector tells peers about itself, the compatibility check, and its options.

Two engines may exchange KV only if their blocks mean the same bytes: same block size, dtype,
layout (blocks outermost: layers, K/V, tokens, kv heads, head dim), transport and model shape.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from connectors.protocol import EngineMetadata
from connectors.transfer import Timeouts
from disagg.config import ConfigError


def parse_timeouts(extra: dict[str, Any]) -> Timeouts:
    """Deadlines from kv_connector_extra_config, validated (numbers, positive)."""
    try:
        t = Timeouts(transfer_timeout_s=float(extra.get("transfer_timeout", 30.0)),
                     defer_timeout_s=float(extra.get("defer_timeout", 60.0)),
                     lease_timeout_s=float(extra.get("lease_timeout", 5.0)),
                     heartbeat_interval_s=float(extra.get("heartbeat_interval", 1.0)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"kv_connector_extra_config timeouts must be numbers: {exc}") from exc
    if min(t.transfer_timeout_s, t.defer_timeout_s, t.lease_timeout_s,
           t.heartbeat_interval_s) <= 0:
        raise ConfigError("transfer_timeout, defer_timeout, lease_timeout and "
                          "heartbeat_interval must be positive")
    return t


def parse_mode_policy(extra: dict[str, Any], kv_role: str,
                      data_parallel_size: int) -> tuple[str, str]:
    """kv_connector_extra_config ``mode`` (read | write) and ``kv_load_failure_policy``
    (fail | recompute), validated against what this engine can do."""
    mode = str(extra.get("mode", "read"))
    if mode not in ("read", "write"):
        raise ConfigError(f"kv_connector_extra_config.mode must be read or write, got {mode!r}")
    policy = str(extra.get("kv_load_failure_policy", "fail"))
    if policy not in ("fail", "recompute"):
        raise ConfigError("kv_load_failure_policy must be fail or recompute")
    if mode == "write" and kv_role != "kv_consumer" and data_parallel_size > 1:
        raise ConfigError("WRITE mode with a data-parallel prefill instance is not "
                          "supported yet; use mode=read or one prefill rank per instance")
    return mode, policy


def slow_path_hint(transport: str, mode: str, kv_role: str, kv_cache_on_gpu: bool) -> str | None:
    """A line for the operator when the configuration takes a known slow path, else None.

    nixl READ between GPUs: NIXL 1.5 batches a WRITE into one scatter-gather copy but posts a
    READ as one pulled copy per block, ~50 % of the peer-copy rate against 75-84 % for WRITE on
    2x H200 (see connectors/transports/nixl.py). Only the reading side (the consumer) pays it.
    """
    if transport == "nixl" and mode == "read" and kv_cache_on_gpu and kv_role != "kv_producer":
        return ("nixl READ between GPUs runs at about half the peer-copy rate (NIXL posts one "
                "pulled copy per block); kv_connector_extra_config mode=write, or transport=ipc "
                "on one host, moves KV faster")
    return None


def parse_layerwise(extra: dict[str, Any], kv_cache_on_gpu: bool) -> bool:
    """kv_connector_extra_config.layerwise: "auto" (default: on when the KV cache is on a GPU,
    where the forward is asynchronous and streaming overlaps it), true or false. It applies to
    WRITE transfers this engine produces."""
    value = extra.get("layerwise", "auto")
    if value == "auto":
        return kv_cache_on_gpu
    if isinstance(value, bool):
        return value
    raise ConfigError(f'kv_connector_extra_config.layerwise must be "auto", true or false, '
                      f"got {value!r}")


def build_metadata(engine: Any, kv_cache: torch.Tensor, engine_id: str, control: Any,
                   worker: Any) -> EngineMetadata:
    """This engine's handshake metadata, with a hash of model shape, dtype and layout."""
    a = engine.arch
    layout = (f"blocks-outermost[L={a.num_layers},2,bs={engine.cfg.cache.block_size},"
              f"Hkv={a.num_kv_heads},D={a.head_dim}]")
    dtype = str(kv_cache.dtype).removeprefix("torch.")
    model_sig = (f"{a.model_type}:{a.vocab_size}:{a.hidden_size}:{a.num_layers}:"
                 f"{a.num_heads}:{a.num_kv_heads}:{a.head_dim}:{a.intermediate_size}")
    digest = hashlib.sha256(f"{model_sig}|{dtype}|{layout}".encode()).hexdigest()[:16]
    return EngineMetadata(
        engine_id=engine_id, host=control.host, handshake_port=control.handshake_port,
        notify_port=control.notify_port, transport=worker.transport.name,
        transport_descriptor=worker.descriptor(), block_size=engine.cfg.cache.block_size,
        block_bytes=worker.block_bytes, num_blocks=kv_cache.shape[0], dtype=dtype,
        compat_hash=digest, layout=layout)


def compat_error(ours: EngineMetadata, peer: EngineMetadata) -> str | None:
    """Why a peer's KV is not interchangeable with ours (None if it is)."""
    for name in ("block_size", "dtype", "layout", "transport"):
        if getattr(peer, name) != getattr(ours, name):
            return (f"{name} differs: peer {peer.engine_id} has {getattr(peer, name)!r}, "
                    f"this engine has {getattr(ours, name)!r}")
    if peer.compat_hash != ours.compat_hash:
        return f"peer {peer.engine_id} serves a different model (compatibility hash)"
    return None
