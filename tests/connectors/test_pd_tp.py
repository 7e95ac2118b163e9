"""P/D between instances of different tensor-parallel sizes (CPU, gloo, tcp transport), READ and
WRITE: the decode's tokens equal a monolithic TP-1 instance's, every consumer rank receives
exactly its KV heads once (the bytes moved say so: a replicating decode gets one copy per rank,
never one per producer replica), verify_kv digests agree across TP sizes, and every ledger is
clean afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from pd_helpers import BASE, info, kv_config, pd_request, settled_metric, wait_clean

from disagg.models.loader import resolve_arch
from disagg.models.parallel import kv_head_range

MAX_MODEL_LEN = 256
BLOCK = 16
PAIRS = [(2, 1), (1, 2), (2, 4)]
"""(prefill TP, decode TP). (2, 4) replicates the 2 KV heads over 4 decode ranks: it runs with
the slow WRITE case (a replicated head by default: tests/disagg/models/test_mla.py, whose
latent is one KV head on every rank of a TP 2 decode)."""


def _prompts() -> list[list[int]]:
    lens = [1, BLOCK, BLOCK + 1, MAX_MODEL_LEN - 8]
    return [[(11 * i + n) % 250 + 1 for i in range(n)] for n in lens]


def _consumer_bytes_per_block(d_tp: int) -> int:
    """Bytes landing in one block over every decode rank."""
    a = resolve_arch("builtin:tiny-llama")
    heads = kv_head_range(a.num_kv_heads, d_tp, 0)[1]
    return a.num_layers * 2 * BLOCK * heads * a.head_dim * 4 * d_tp


@pytest.mark.parametrize(("mode", "pairs"), [
    ("read", PAIRS[:2]), pytest.param("write", PAIRS, marks=pytest.mark.slow)])
def test_mixed_tp_pd_equals_monolithic(instance_factory: Any, mode: str,
                                       pairs: list[tuple[int, int]]) -> None:
    common = [*BASE, "--max-model-len", str(MAX_MODEL_LEN)]

    def args(role: str, tp: int) -> list[str]:
        return [*common, "-tp", str(tp), "--kv-transfer-config",
                kv_config(role, mode, verify_kv=True)]

    p_tps, d_tps = sorted({p for p, _ in pairs}), sorted({d for _, d in pairs})
    mono, *rest = instance_factory.many(
        common, *(args("kv_producer", tp) for tp in p_tps),
        *(args("kv_consumer", tp) for tp in d_tps), ready_timeout_s=180)
    prefill = dict(zip(p_tps, rest[:len(p_tps)], strict=True))
    decode = dict(zip(d_tps, rest[len(p_tps):], strict=True))
    for tp, inst in [*prefill.items(), *decode.items()]:
        assert info(inst.url)["tp_size"] == tp
    prompts = _prompts()
    blocks = sum(-(-(len(p) - 1) // BLOCK) for p in prompts)

    async def go() -> dict[tuple[int, int], list[list[int]]]:
        out: dict[tuple[int, int], list[list[int]]] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            expected = []
            for prompt in prompts:
                body = {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                        "ignore_eos": True, "return_token_ids": True}
                async with s.post(mono.url + "/v1/completions", json=body) as r:
                    expected.append((await r.json())["choices"][0]["token_ids"])
            out[(0, 0)] = expected
            for p_tp, d_tp in pairs:
                p, d = prefill[p_tp], decode[d_tp]
                got = []
                for prompt in prompts:
                    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                            "ignore_eos": True, "return_token_ids": True}
                    status, res = await pd_request(s, p.url, d.url, body, mode, info(p.url),
                                                   info(d.url))
                    assert status == 200, (p_tp, d_tp, res)
                    got.append(res["choices"][0]["token_ids"])
                out[(p_tp, d_tp)] = got
        return out

    results = asyncio.run(go())
    for pair in pairs:
        assert results[pair] == results[(0, 0)], pair
    # bytes land once per decode rank and block: (2,1) and (1,2) move the model's bytes,
    # (2,4) twice that (the decode replicates its 2 KV heads over 4 ranks), never more
    want: dict[str, float] = {}
    for p_tp, d_tp in pairs:
        side = decode[d_tp].url if mode == "read" else prefill[p_tp].url
        want[side] = want.get(side, 0.0) + blocks * _consumer_bytes_per_block(d_tp)
    for url, nbytes in want.items():
        assert settled_metric(url, "disagg_kv_connector_bytes_moved_total", nbytes) == nbytes
    for inst in [*prefill.values(), *decode.values()]:
        assert settled_metric(inst.url, "disagg_kv_connector_kv_refused_total", 0.0) == 0.0
        wait_clean(inst.url)
