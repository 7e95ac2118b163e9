"""MoE serving across processes on CPU. Expert parallelism over data-parallel ranks (gloo
all-to-all): the same greedy tokens as one rank holding every expert, with ranks busy and idle
in the same steps; a rank that dies mid-exchange fails the requests with one line and the
instance goes down, never hangs; P/D with an EP side. Tensor parallelism: every rank's slice
of every expert gives the tokens of TP 1."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp
import pytest
import requests  # type: ignore[import-untyped]

from disagg.common.sampling_params import SamplingParams
from disagg.common.tokenizer import get_tokenizer
from disagg.llm import LLM

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
MOE = ["builtin:tiny-moe", "--device", "cpu", "--kv-cache-memory-bytes", "8MiB",
       "--admin-key", KEY]
PROMPTS = [f"expert {i}: " + "route me " * (i % 5) for i in range(7)]


async def _greedy(url: str, prompts: list[str], max_tokens: int = 12) -> list[list[int]]:
    """Concurrent greedy completions (spread over the ranks, different lengths)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def one(i: int, prompt: str) -> list[int]:
            body = {"prompt": prompt, "max_tokens": max_tokens - i % 4, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}
            async with s.post(url + "/v1/completions", json=body) as r:
                out = await r.json()
                assert r.status == 200, out
                return list(out["choices"][0]["token_ids"])

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def _one_engine(prompts: list[str], max_tokens: int = 12) -> list[list[int]]:
    """``_greedy``'s tokens from one engine in this process holding every expert."""
    ids = [get_tokenizer(MOE[0]).encode(p) for p in prompts]
    params = [SamplingParams(max_tokens=max_tokens - i % 4, temperature=0.0, ignore_eos=True)
              for i in range(len(prompts))]
    with LLM(MOE[0], device="cpu", kv_cache_memory_bytes=8 * 2**20) as llm:
        return [o.output_token_ids for o in llm.generate(ids, params)]


def _rpc(url: str, method: str) -> list[dict[str, Any]]:
    r = requests.post(url + "/collective_rpc", headers=AUTH, json={"method": method},
                      timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


@pytest.mark.parametrize("dp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_expert_parallel_equals_one_rank_with_every_expert(instance_factory, dp: int) -> None:
    ep = instance_factory([*MOE, "-dp", str(dp), "--enable-expert-parallel"])
    expected = _one_engine(PROMPTS)
    assert asyncio.run(_greedy(ep.url, PROMPTS)) == expected
    # one prompt: every other rank only lends its experts (dummy steps in the same waves)
    assert asyncio.run(_greedy(ep.url, PROMPTS[:1])) == expected[:1]
    states = _rpc(ep.url, "dp_state")
    assert [(s["lockstep"], s["expert_parallel_size"]) for s in states] == [(True, dp)] * dp
    assert sum(s["num_requests_total"] for s in _rpc(ep.url, "stats")) == len(PROMPTS) + 1
    ledger = requests.get(ep.url + "/v1/kv_ledger", timeout=5).json()["ranks"]
    assert all(r["held"] == 0 for r in ledger)


# experts sliced over 2 TP ranks (the same SparseMoeBlock) give TP 1's tokens in the default
# tests/disagg/models/test_mla.py::test_tensor_parallel_2_gives_the_tp_1_tokens[v2-lite] and
# test_pd_moves_exactly_the_latents_and_equals_monolithic (DeepSeek MoE layers at TP 2)
@pytest.mark.slow
def test_moe_under_tensor_parallelism_equals_tp1(instance_factory) -> None:
    tp2 = instance_factory([*MOE, "-tp", "2"], ready_timeout_s=120)
    assert asyncio.run(_greedy(tp2.url, PROMPTS[:4])) == _one_engine(PROMPTS[:4])


def test_expert_parallel_flags_are_checked(instance_factory) -> None:
    cases = ((["--enable-expert-parallel"], "add -dp N with N >= 2"),
             (["-dp", "2", "-tp", "2", "--enable-expert-parallel"], "not built yet"),
             (["-dp", "3", "--enable-expert-parallel"], "multiple of 3"))
    insts = instance_factory.many(*([*MOE, *args] for args, _ in cases), expect_ready=False)
    for inst, (_, words) in zip(insts, cases, strict=True):
        assert inst.proc.wait(60) != 0
        log = inst.log()
        assert words in log and "Traceback" not in log, log


def test_a_rank_killed_mid_exchange_fails_requests_and_ends_the_instance(
        instance_factory) -> None:
    inst = instance_factory([*MOE, "-dp", "2", "--enable-expert-parallel",
                             "--dp-collective-timeout", "10"])
    pids = [s["pid"] for s in _rpc(inst.url, "dp_state")]

    async def run() -> list[int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async def one(i: int) -> int:
                body = {"prompt": f"long {i}", "max_tokens": 3000, "ignore_eos": True}
                async with s.post(inst.url + "/v1/completions", json=body) as r:
                    await r.read()
                    return r.status

            tasks = [asyncio.ensure_future(one(i)) for i in range(4)]
            await asyncio.sleep(1.5)
            os.kill(pids[1], signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 30)

    t0 = time.monotonic()
    statuses = asyncio.run(run())
    assert all(code in (500, 503) for code in statuses), statuses
    assert inst.proc.wait(30) != 0 and time.monotonic() - t0 < 40
    assert "Traceback" not in inst.log().split("disagg: error:")[-1]


@pytest.mark.parametrize("ep_side,mode", [
    ("both", "read"),
    # the both-read case covers these: each of its sides is an expert-parallel one
    pytest.param("decode", "read", marks=pytest.mark.slow),
    pytest.param("prefill", "read", marks=pytest.mark.slow)])
def test_pd_with_an_expert_parallel_side_equals_monolithic(instance_factory, ep_side: str,
                                                           mode: str) -> None:
    """The KV of each request moves between whichever DP ranks served it (READ: WRITE with a
    data-parallel instance is refused at start, tests/connectors/test_pd_config.py)."""
    from tests.connectors.pd_helpers import info, kv_config, pd_request, settled_metric, wait_clean

    ep = ["-dp", "2", "--enable-expert-parallel"]
    prefill, decode = instance_factory.many(
        [*MOE, *(ep if ep_side in ("prefill", "both") else []),
         "--kv-transfer-config", kv_config("kv_producer", mode)],
        [*MOE, *(ep if ep_side in ("decode", "both") else []),
         "--kv-transfer-config", kv_config("kv_consumer", mode)])
    prompts = [[(7 * i + n) % 250 + 1 for i in range(n)] for n in (1, 16, 17, 40, 90, 33)]
    with LLM(MOE[0], device="cpu", kv_cache_memory_bytes=8 * 2**20) as mono:
        expected = [o.output_token_ids for o in mono.generate(prompts, SamplingParams(
            max_tokens=6, temperature=0.0, ignore_eos=True))]

    async def go() -> list[list[int]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            async def pd_one(p: list[int]) -> list[int]:
                body = {"prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True}
                status, res = await pd_request(s, prefill.url, decode.url, body, mode,
                                               info(prefill.url), info(decode.url))
                assert status == 200, res
                return list(res["choices"][0]["token_ids"])

            return await asyncio.gather(*(pd_one(p) for p in prompts))  # every rank busy

    assert asyncio.run(go()) == expected
    ep_insts = {"prefill": [prefill], "decode": [decode], "both": [prefill, decode]}[ep_side]
    for ep_inst in ep_insts:
        per_rank = [s["num_requests_total"] for s in _rpc(ep_inst.url, "stats")]
        assert all(n > 0 for n in per_rank), per_rank  # the frontend spread them over the ranks
    for inst in (prefill, decode):
        assert settled_metric(inst.url, "disagg_kv_connector_kv_refused_total", 0.0) == 0.0
        wait_clean(inst.url)
