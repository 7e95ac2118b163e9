"""P/D with prefix caching on both sides: a prompt whose prefix the decode already holds moves
only the blocks after it (READ: the decode reads only those; WRITE: its remote_blocks marks the
hits and the prefill skips them), a prompt the decode holds entirely moves nothing, the prefill
computes only the suffix it lacks, and every answer equals a monolithic instance's.

One prefill, decode and monolithic instance serve both tests: each request names its mode
(``pd_request``), each mode has its own system prompt (no block in common) and the counters
are read as differences."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
from pd_helpers import BASE, info, kv_config, metric, pd_request, settled_metric, wait_clean
from support import Instance, start_instances, stop_all

from disagg.models.loader import resolve_arch

MAX_MODEL_LEN = 256
BLOCK = 16
SYSTEM_LEN = 4 * BLOCK


def _system(mode: str) -> list[int]:
    """A 4-block shared system prompt, another one per mode (the instances are shared)."""
    k = ("read", "write").index(mode)
    return [(13 * i + k) % 250 + 1 for i in range(SYSTEM_LEN)]


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Instance]]:
    """[prefill, decode, monolithic]."""
    common = [*BASE, "--max-model-len", str(MAX_MODEL_LEN)]
    started = start_instances(
        [[*common, "--kv-transfer-config", kv_config("kv_producer", "read", verify_kv=True)],
         [*common, "--kv-transfer-config", kv_config("kv_consumer", "read", verify_kv=True)],
         [*common, "--no-enable-prefix-caching"]], tmp_path_factory.mktemp("prefix"))
    try:
        yield started
    finally:
        stop_all(started)


def _block_bytes() -> int:
    a = resolve_arch("builtin:tiny-llama")
    return a.num_layers * 2 * BLOCK * a.num_kv_heads * a.head_dim * 4


def _moved_blocks(prompt: list[int], cached_blocks: int) -> int:
    return -(-(len(prompt) - 1) // BLOCK) - cached_blocks


@pytest.mark.parametrize("mode", ["read", "write"])
def test_decode_side_hits_move_only_the_missing_blocks(instances: list[Instance],
                                                       mode: str) -> None:
    p, d, mono = instances
    moving = d.url if mode == "read" else p.url
    system = _system(mode)
    hits_before = {x.url: metric(x.url, "disagg_prefix_cache_hits") for x in (p, d)}
    # (prompt, blocks the decode holds when it arrives): the first fills both caches with
    # system; the next share it; the last is system plus one token: nothing left to move
    cases = [(system + [7, 8, 9, 10, 11, 12], 0), (system + list(range(20, 30)), 4),
             (system + [5] * 20, 4), (system + [99], 4)]

    async def go(s: aiohttp.ClientSession) -> None:
        p_info, d_info = info(p.url), info(d.url)
        moved = metric(moving, "disagg_kv_connector_bytes_moved_total")
        for prompt, cached in cases:
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}
            async with s.post(mono.url + "/v1/completions", json=body) as r:
                want = (await r.json())["choices"][0]["token_ids"]
            status, out = await pd_request(s, p.url, d.url, body, mode, p_info, d_info)
            assert status == 200, out
            assert out["choices"][0]["token_ids"] == want, (len(prompt), cached)
            moved += _moved_blocks(prompt, cached) * _block_bytes()
            got = settled_metric(moving, "disagg_kv_connector_bytes_moved_total", moved)
            assert got == moved, (len(prompt), cached, got, moved)

    async def run() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            await go(s)

    asyncio.run(run())
    # the decode found system three times; the prefill too (it computed only the suffixes)
    for x in (d, p):
        assert metric(x.url, "disagg_prefix_cache_hits") - hits_before[x.url] == 3 * SYSTEM_LEN
    assert metric(d.url, "disagg_kv_connector_kv_refused_total") == 0
    wait_clean(p.url)
    wait_clean(d.url)
