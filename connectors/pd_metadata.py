"""What the P/D connector tells peers about itself, and the compatibility check.

Two engines may exchange KV only if their blocks mean the same bytes: same block size, dtype,
layout (blocks outermost: layers, K/V, tokens, kv heads, head dim), transport and model shape;
an fp8 cache (--kv-cache-dtype fp8) also the same per-layer scales, since a stored byte means
byte * scale (disagg/engine/kv_quant.py). Refusing at the handshake fails the transfer closed
(the request fails or recomputes, as any refused handshake); KV is never misread.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from connectors.protocol import EngineMetadata
from disagg.engine.kv_quant import describe_scales
from disagg.models.parallel import kv_head_range


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


def build_metadata(engine: Any, kv_cache: torch.Tensor, engine_id: str, epoch: int,
                   control: Any, worker: Any) -> EngineMetadata:
    """This engine's handshake metadata, with a hash of model shape, dtype, fp8 scales and
    layout. ``engine.kv_spec`` (disagg/engine/kv_quant.py) gives the cache's --kv-cache-dtype
    and scales; an engine without one has a plain (auto) cache."""
    a = engine.arch
    layout = (f"blocks-outermost[L={a.num_layers},2,bs={engine.cfg.cache.block_size},"
              f"Hkv={a.num_kv_heads},D={a.head_dim}]")
    dtype = str(kv_cache.dtype).removeprefix("torch.")
    spec = getattr(engine, "kv_spec", None)
    kv_name, scales = (spec.name, spec.scales()) if spec is not None else ("auto", [])
    model_sig = (f"{a.model_type}:{a.vocab_size}:{a.hidden_size}:{a.num_layers}:"
                 f"{a.num_heads}:{a.num_kv_heads}:{a.head_dim}:{a.intermediate_size}")
    kv_sig = f"|{kv_name}:{','.join(map(repr, scales))}" if scales else ""
    digest = hashlib.sha256(f"{model_sig}|{dtype}|{layout}{kv_sig}".encode()).hexdigest()[:16]
    return EngineMetadata(
        engine_id=engine_id, epoch=epoch, host=control.host, handshake_port=control.handshake_port,
        notify_port=control.notify_port, transport=worker.transport.name,
        transport_descriptor=worker.descriptor(), block_size=engine.cfg.cache.block_size,
        block_bytes=worker.block_bytes, num_blocks=kv_cache.shape[0], dtype=dtype,
        compat_hash=digest, layout=layout, tp_size=worker.tp_size,
        rank_descriptors=worker.descriptors(), kv_cache_dtype=kv_name, kv_scales=scales)


def _kv_cache_desc(meta: EngineMetadata) -> str:
    """``float8_e4m3fn (--kv-cache-dtype fp8_e4m3, scales k=v=1 in every layer)``."""
    if not meta.kv_scales:
        return f"{meta.dtype} (--kv-cache-dtype {meta.kv_cache_dtype})"
    return (f"{meta.dtype} (--kv-cache-dtype {meta.kv_cache_dtype}, "
            f"{describe_scales(list(meta.kv_scales))})")


def kv_cache_error(ours: EngineMetadata, peer: EngineMetadata) -> str | None:
    """Why the peer's KV elements mean other values than ours: another dtype, or an fp8 cache
    with other scales (None if they mean the same). One line naming both sides."""
    if (peer.dtype, peer.kv_cache_dtype) != (ours.dtype, ours.kv_cache_dtype):
        return (f"KV cache dtype differs: peer {peer.engine_id}'s is {_kv_cache_desc(peer)}, "
                f"this engine's ({ours.engine_id}) is {_kv_cache_desc(ours)}: start both "
                "with the same --kv-cache-dtype")
    if list(peer.kv_scales) != list(ours.kv_scales):
        layer = next((i // 2 for i, (a, b) in enumerate(zip(peer.kv_scales, ours.kv_scales))
                      if a != b), min(len(peer.kv_scales), len(ours.kv_scales)) // 2)
        return (f"fp8 KV cache scales differ: peer {peer.engine_id} has "
                f"{describe_scales(list(peer.kv_scales))}, this engine ({ours.engine_id}) "
                f"{describe_scales(list(ours.kv_scales))} (first difference at layer "
                f"{layer}): load both from the same checkpoint")
    return None


def compat_error(ours: EngineMetadata, peer: EngineMetadata, num_kv_heads: int) -> str | None:
    """Why a peer's KV is not interchangeable with ours (None if it is)."""
    if peer.block_size != ours.block_size:
        return (f"block_size differs: peer {peer.engine_id} has {peer.block_size!r}, "
                f"this engine has {ours.block_size!r}")
    if (kv_error := kv_cache_error(ours, peer)) is not None:
        return kv_error
    for name in ("layout", "transport"):
        if getattr(peer, name) != getattr(ours, name):
            return (f"{name} differs: peer {peer.engine_id} has {getattr(peer, name)!r}, "
                    f"this engine has {getattr(ours, name)!r}")
    if peer.compat_hash != ours.compat_hash:
        return f"peer {peer.engine_id} serves a different model (compatibility hash)"
    if len(peer.rank_descriptors) not in (0, peer.tp_size) or (
            not peer.rank_descriptors and peer.tp_size != 1):
        return (f"peer {peer.engine_id} says tp_size {peer.tp_size} but sends "
                f"{len(peer.rank_descriptors)} rank descriptors")
    if num_kv_heads % peer.tp_size and peer.tp_size % num_kv_heads:
        return (f"peer {peer.engine_id}'s tp_size {peer.tp_size} does not split "
                f"{num_kv_heads} KV heads")
    expected = ours.block_bytes // kv_head_range(num_kv_heads, ours.tp_size, 0)[1] \
        * kv_head_range(num_kv_heads, peer.tp_size, 0)[1]
    if peer.block_bytes != expected:
        return (f"peer {peer.engine_id} has {peer.block_bytes}-byte blocks at tp_size "
                f"{peer.tp_size}; the model's layout gives {expected}")
    return None
