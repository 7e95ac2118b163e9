"""P/D with prefix caching on both sides: a prompt whose prefix the decode already holds moves
only the blocks after it (READ: the decode reads only those; WRITE: its remote_blocks marks the
hits and the prefill skips them), a prompt the decode holds entirely moves nothing, the prefill
computes only the suffix it lacks, and every answer equals a monolithic instance's."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from pd_helpers import BASE, info, kv_config, metric, pd_request, settled_metric, wait_clean

from disagg.models.loader import resolve_arch

MAX_MODEL_LEN = 256
BLOCK = 16
SYSTEM = [(13 * i) % 250 + 1 for i in range(4 * BLOCK)]  # a 4-block shared system prompt


def _block_bytes() -> int:
    a = resolve_arch("builtin:tiny-llama")
    return a.num_layers * 2 * BLOCK * a.num_kv_heads * a.head_dim * 4


def _moved_blocks(prompt: list[int], cached_blocks: int) -> int:
    return -(-(len(prompt) - 1) // BLOCK) - cached_blocks


@pytest.mark.parametrize("mode", ["read", "write"])
def test_decode_side_hits_move_only_the_missing_blocks(instance_factory: Any, mode: str) -> None:
    common = [*BASE, "--max-model-len", str(MAX_MODEL_LEN)]
    p, d, mono = instance_factory.many(
        [*common, "--kv-transfer-config", kv_config("kv_producer", mode, verify_kv=True)],
        [*common, "--kv-transfer-config", kv_config("kv_consumer", mode, verify_kv=True)],
        [*common, "--no-enable-prefix-caching"])
    moving = d.url if mode == "read" else p.url
    # (prompt, blocks the decode holds when it arrives): the first fills both caches with
    # SYSTEM; the next share it; the last is SYSTEM plus one token: nothing left to move
    cases = [(SYSTEM + [7, 8, 9, 10, 11, 12], 0), (SYSTEM + list(range(20, 30)), 4),
             (SYSTEM + [5] * 20, 4), (SYSTEM + [99], 4)]

    async def go(s: aiohttp.ClientSession) -> None:
        p_info, d_info = info(p.url), info(d.url)
        moved = 0.0
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
    # the decode found SYSTEM three times; the prefill too (it computed only the suffixes)
    assert metric(d.url, "disagg_prefix_cache_hits") == 3 * len(SYSTEM)
    assert metric(p.url, "disagg_prefix_cache_hits") == 3 * len(SYSTEM)
    assert metric(d.url, "disagg_kv_connector_kv_refused_total") == 0
    wait_clean(p.url)
    wait_clean(d.url)
