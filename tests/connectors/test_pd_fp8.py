"""P/D with an fp8 KV cache (--kv-cache-dtype fp8), engines in this process over loopback TCP:
the decode's greedy tokens equal a monolithic fp8 engine's, the transfer moves one byte per
cached element, and peers whose KV dtype or fp8 scales differ are refused at the handshake
with one line naming both sides (the request fails closed; the producer frees its blocks)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from connectors.pd_metadata import build_metadata, compat_error
from disagg.common.config import CacheConfig, EngineConfig, KVTransferConfig, ModelConfig
from disagg.common.kv_transfer_params import KVTransferParams, TransferMode
from disagg.common.protocol import EngineCoreOutput, EngineCoreRequest
from disagg.common.sampling_params import SamplingParams
from disagg.engine.engine_core import EngineCore
from disagg.engine.kv_quant import KVCacheSpec
from disagg.models.loader import resolve_arch

PROMPT = [(7 * i + 3) % 250 + 1 for i in range(40)]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
BLOCK_SIZE = 16
FAST = {"transfer_timeout": 2, "defer_timeout": 2, "lease_timeout": 1,
        "heartbeat_interval": 0.25}
"""Short deadlines: a refused peer never leases the prefill's hold, which expires (frees)."""


@pytest.fixture
def engines() -> Iterator[Any]:
    """Make engines; every one is closed at teardown."""
    made: list[EngineCore] = []

    def make(role: str | None, kv_cache_dtype: str) -> EngineCore:
        kt = None if role is None else KVTransferConfig(
            kv_connector="PDConnector", kv_role=role, kv_connector_extra_config={
                "transport": "tcp", "mode": "read", "host": "127.0.0.1", **FAST})
        engine = EngineCore(EngineConfig(
            model=ModelConfig(model="builtin:tiny-llama", served_model_name="m", device="cpu",
                              max_model_len=256),
            cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=2 * 2**20,
                              enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype),
            kv_transfer=kt))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def _run(steppers: list[EngineCore], request_id: str, timeout_s: float = 20.0
         ) -> tuple[list[int], EngineCoreOutput]:
    """Step the engines in turn until ``request_id`` finishes; its tokens and last output."""
    tokens: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for engine in steppers:
            for out in engine.step():
                if out.request_id == request_id:
                    tokens += out.new_token_ids
                    if out.finish_reason is not None:
                        return tokens, out
        time.sleep(0.001)
    raise AssertionError(f"{request_id} did not finish within {timeout_s} s")


def _pd(prefill: EngineCore, decode: EngineCore) -> tuple[list[int], EngineCoreOutput]:
    """One READ-mode P/D request, as the proxy would drive it."""
    tid = uuid.uuid4().hex
    prefill.add_request(EngineCoreRequest(
        request_id="p", prompt_token_ids=PROMPT,
        sampling_params=msgspec.structs.replace(GREEDY, max_tokens=1),
        kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_decode=True,
                                            mode=TransferMode.READ)))
    _, done = _run([prefill], "p")
    assert done.kv_transfer_params is not None, done.error
    params = msgspec.structs.replace(done.kv_transfer_params, do_remote_prefill=True)
    decode.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=PROMPT,
                                         sampling_params=GREEDY, kv_transfer_params=params))
    return _run([decode, prefill], "d")


def _settle_clean(*engines: EngineCore, timeout_s: float = 5.0) -> None:
    """Step until every block is free again on every engine (the ledger after a transfer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snaps = [e.pool.snapshot() for e in engines]
        if all(s.free == s.total and s.held == 0 for s in snaps):
            return
        for engine in engines:
            engine.step()
        time.sleep(0.01)
    raise AssertionError(f"ledger not clean: {[e.pool.snapshot() for e in engines]}")


def test_pd_with_fp8_kv_equals_monolithic_fp8_and_moves_one_byte_per_element(engines):
    mono = engines(None, "fp8")
    mono.add_request(EngineCoreRequest(request_id="m", prompt_token_ids=PROMPT,
                                       sampling_params=GREEDY))
    want, _ = _run([mono], "m")
    prefill, decode = engines("kv_producer", "fp8"), engines("kv_consumer", "fp8")
    got, out = _pd(prefill, decode)
    assert out.error is None and got == want
    arch = resolve_arch("builtin:tiny-llama")
    # READ moves whole blocks of the prompt's computed tokens (all but the last), every layer,
    # K and V, one byte per element
    moved_tokens = -(-(len(PROMPT) - 1) // BLOCK_SIZE) * BLOCK_SIZE
    per_token = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * 1
    assert decode.connector.metrics()["bytes_moved_total"] == moved_tokens * per_token
    _settle_clean(prefill, decode)


def test_fp8_and_auto_peers_are_refused_with_both_dtypes_named(engines):
    prefill, decode = engines("kv_producer", "fp8"), engines("kv_consumer", "auto")
    tokens, out = _pd(prefill, decode)
    assert tokens == [] and out.error is not None  # failed closed: no token from foreign KV
    assert "KV cache dtype differs" in out.error and "\n" not in out.error
    for side in ("float8_e4m3fn (--kv-cache-dtype fp8_e4m3, scales k=v=1",
                 "float32 (--kv-cache-dtype auto)", "start both with the same --kv-cache-dtype"):
        assert side in out.error, out.error
    _settle_clean(prefill, decode)  # the prefill's hold, never leased, expired and freed


def _metadata(kv_spec: KVCacheSpec | None, dtype_bytes: int) -> Any:
    """Handshake metadata of a tiny-llama engine with this cache spec (None: no spec)."""
    import torch

    arch = resolve_arch("builtin:tiny-llama")
    engine = SimpleNamespace(arch=arch, kv_spec=kv_spec,
                             cfg=SimpleNamespace(cache=SimpleNamespace(block_size=16)))
    block_bytes = arch.num_layers * 2 * 16 * arch.num_kv_heads * arch.head_dim * dtype_bytes
    worker = SimpleNamespace(transport=SimpleNamespace(name="tcp"), descriptor=lambda: b"",
                             descriptors=lambda: [b""], tp_size=1, block_bytes=block_bytes)
    control = SimpleNamespace(host="127.0.0.1", handshake_port=1, notify_port=2)
    dtype = kv_spec.dtype if kv_spec is not None else torch.float32
    cache = torch.empty((8, 0), dtype=dtype)
    return build_metadata(engine, cache, f"e-{uuid.uuid4().hex[:6]}", 1, control, worker)


def test_fp8_peers_with_other_scales_are_refused_and_equal_ones_accepted():
    import torch

    layers = resolve_arch("builtin:tiny-llama").num_layers
    ones = (1.0,) * layers
    half = (0.5,) + ones[1:]
    ours = _metadata(KVCacheSpec("fp8_e4m3", torch.float8_e4m3fn, ones, ones), 1)
    same = _metadata(KVCacheSpec("fp8_e4m3", torch.float8_e4m3fn, ones, ones), 1)
    other = _metadata(KVCacheSpec("fp8_e4m3", torch.float8_e4m3fn, half, ones), 1)
    assert compat_error(ours, same, 4) is None
    error = compat_error(ours, other, 4)
    assert error is not None and "fp8 KV cache scales differ" in error
    assert "first difference at layer 0" in error and "k 0.5..1" in error
    # an engine without a spec (older, or a test double) has a plain auto cache
    plain = _metadata(None, 4)
    assert plain.kv_cache_dtype == "auto" and plain.kv_scales == []
    auto = _metadata(KVCacheSpec("auto", torch.float32, ones, ones), 4)
    assert compat_error(plain, auto, 4) is None
    assert plain.compat_hash == auto.compat_hash != ours.compat_hash
