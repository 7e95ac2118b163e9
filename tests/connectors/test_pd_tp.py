"""P/D between instances of different tensor-parallel sizes (CPU, gloo, tcp transport), READ and
WRITE: the decode's tokens equal a monolithic TP-1 engine's, every consumer rank receives
exactly its KV heads once (the bytes moved say so: a replicating decode gets one copy per rank,
never one per producer replica), verify_kv digests agree across TP sizes, and every ledger is
clean afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from pd_helpers import BASE, info, kv_config, pd_request, settled_metric, wait_clean

from disagg.common.sampling_params import SamplingParams
from disagg.llm import LLM
from disagg.models.loader import resolve_arch
from disagg.models.parallel import kv_head_range

MAX_MODEL_LEN = 256
BLOCK = 16
PAIRS = [(2, 1), (1, 2), (2, 4)]
"""(prefill TP, decode TP). (2, 4) replicates the 2 KV heads over 4 decode ranks: it runs with
the slow WRITE case (a replicated head by default: tests/disagg/models/test_mla.py, whose
latent is one KV head on every rank of a TP 2 decode)."""


def _prompts(pair_index: int) -> list[list[int]]:
    """Prompts of their own for each pair: no instance finds another pair's blocks cached."""
    lens = [1, BLOCK, BLOCK + 1, MAX_MODEL_LEN - 8]
    return [[(11 * i + n + 37 * pair_index) % 250 + 1 for i in range(n)] for n in lens]


def _consumer_bytes_per_block(d_tp: int) -> int:
    """Bytes landing in one block over every decode rank."""
    a = resolve_arch("builtin:tiny-llama")
    heads = kv_head_range(a.num_kv_heads, d_tp, 0)[1]
    return a.num_layers * 2 * BLOCK * heads * a.head_dim * 4 * d_tp


@pytest.mark.parametrize(("mode", "pairs"), [
    ("read", PAIRS[:2]), pytest.param("write", PAIRS, marks=pytest.mark.slow)])
def test_mixed_tp_pd_equals_monolithic(instance_factory: Any, mode: str,
                                       pairs: list[tuple[int, int]]) -> None:
    """One instance per TP size (kv_both): the prefill of one pair is the decode of another,
    as the connector takes its side of each transfer from the request's kv_transfer_params.
    The reference is a monolithic TP-1 engine in this process."""
    common = [*BASE, "--max-model-len", str(MAX_MODEL_LEN)]
    tps = sorted({tp for pair in pairs for tp in pair})
    inst = dict(zip(tps, instance_factory.many(
        *([*common, "-tp", str(tp), "--kv-transfer-config",
           kv_config("kv_both", mode, verify_kv=True)] for tp in tps),
        ready_timeout_s=180), strict=True))
    for tp, i in inst.items():
        assert info(i.url)["tp_size"] == tp
    prompts = {pair: _prompts(k) for k, pair in enumerate(pairs)}
    with LLM(device="cpu", kv_cache_memory_bytes=16 * 2**20,
             max_model_len=MAX_MODEL_LEN) as llm:
        greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        expected = {pair: [o.output_token_ids for o in llm.generate(ps, greedy)]
                    for pair, ps in prompts.items()}
    blocks = sum(-(-(len(p) - 1) // BLOCK) for p in prompts[pairs[0]])

    async def go() -> dict[tuple[int, int], list[list[int]]]:
        out: dict[tuple[int, int], list[list[int]]] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            for p_tp, d_tp in pairs:
                p, d = inst[p_tp], inst[d_tp]
                got = []
                for prompt in prompts[(p_tp, d_tp)]:
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
        assert results[pair] == expected[pair], pair
    # bytes land once per decode rank and block: (2,1) and (1,2) move the model's bytes,
    # (2,4) twice that (the decode replicates its 2 KV heads over 4 ranks), never more; only
    # the side that posts the transfers counts them (READ: the decode, WRITE: the prefill)
    want: dict[str, float] = {i.url: 0.0 for i in inst.values()}
    for p_tp, d_tp in pairs:
        side = inst[d_tp].url if mode == "read" else inst[p_tp].url
        want[side] += blocks * _consumer_bytes_per_block(d_tp)
    for url, nbytes in want.items():
        assert settled_metric(url, "disagg_kv_connector_bytes_moved_total", nbytes) == nbytes
    for i in inst.values():
        assert settled_metric(i.url, "disagg_kv_connector_kv_refused_total", 0.0) == 0.0
        wait_clean(i.url)
