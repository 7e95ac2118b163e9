"""KV-aware routing end to end: two real prefill instances and one decode, registered with the
proxy over ZMQ (their prefix-cache events with them), under cache pressure. A shared-prefix
workload finds its prefix on the prefill it goes to almost every time with ``kv_aware``, about
half the time with ``round_robin`` (measured by the instances' own /metrics, once every prefix
has been seen: its first use misses under any policy)."""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

import aiohttp
import pytest
from support import free_port

from proxy.config import PolicyName
from proxy.registry import Pool

NUM_PREFIXES = 7
"""Odd, so round robin sends each prefix to both prefills."""
NUM_ROUNDS = 6
"""Measured rounds after the cold one: each prefix used once per round, rounds shuffled, 42
measured requests per policy."""
PREFIX_CHARS = 239
"""BOS + 239 bytes = 15 full blocks of 16 tokens; one suffix byte makes 241 tokens."""
PREFILL_BLOCKS = 72
"""Each prefill holds 4-5 of the 7 prefixes (15 blocks each)."""
CONCURRENCY = 2
"""Requests in flight: with 2 prefills, at most one other request outstanding on the one
holding a prefix, whose load penalty (LOAD_WEIGHT x prompt) stays under what its cache saves."""
TIMEOUTS = {"prefill_timeout_s": 60.0, "first_byte_timeout_s": 60.0, "request_timeout_s": 60.0,
            "health_check_interval_s": 0.5}


def _kv_config(role: str) -> str:
    return json.dumps({"kv_connector": "PDConnector", "kv_role": role,
                       "kv_connector_extra_config": {"transport": "tcp", "mode": "read"}})


def _workload(tag: str, rng: random.Random) -> tuple[list[str], list[str]]:
    """NUM_PREFIXES distinct prefixes: a cold round that uses each once (nothing to find yet),
    then NUM_ROUNDS rounds that each use every prefix once, in a random order per round."""
    prefixes = [f"{tag}{i}:" + "".join(rng.choice("abcdefghij") for _ in range(PREFIX_CHARS - 3))
                for i in range(NUM_PREFIXES)]
    rounds = []
    for _ in range(1 + NUM_ROUNDS):
        order = list(range(NUM_PREFIXES))
        rng.shuffle(order)
        rounds.append([prefixes[i] + rng.choice("xyz") for i in order])
    return rounds[0], [p for r in rounds[1:] for p in r]


async def _counter(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text,
                                                      re.M))


async def _hit_rate(http: aiohttp.ClientSession, proxy_url: str, prefills: list[str],
                    prompts: list[str]) -> float:
    """Send ``prompts`` through the proxy; prefix-cache hits / lookups over the prefills."""
    async def totals() -> tuple[float, float]:
        hits = [await _counter(http, u, "disagg_prefix_cache_hits") for u in prefills]
        queries = [await _counter(http, u, "disagg_prefix_cache_queries") for u in prefills]
        return sum(hits), sum(queries)

    hits0, queries0 = await totals()
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(prompt: str) -> None:
        async with gate, http.post(proxy_url + "/v1/completions", json={
                "prompt": prompt, "max_tokens": 2, "temperature": 0}) as resp:
            assert resp.status == 200, await resp.text()

    await asyncio.gather(*(one(p) for p in prompts))
    hits, queries = await totals()
    assert queries - queries0 >= len(prompts) * (PREFIX_CHARS + 2)
    return (hits - hits0) / (queries - queries0)


async def _wait_registered(proxy: Any, timeout_s: float = 30.0) -> None:
    st, loop = proxy.state, asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (len(st.registry.healthy(Pool.PREFILL)) < 2 or not st.registry.healthy(Pool.DECODE)
           or st.kv_index.num_fresh() < 3):
        assert loop.time() < deadline, "instances did not register with their KV views"
        await asyncio.sleep(0.05)


async def _index_settled(proxy: Any, timeout_s: float = 30.0, quiet_s: float = 0.5) -> None:
    """Wait until the proxy's KV index stopped growing for ``quiet_s`` (several publish
    intervals): the instances publish every 0.1 s, and on a loaded machine the cold round's
    last events can still be on their way when the next round starts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last, since = -1, loop.time()
    while loop.time() - since < quiet_s:
        assert loop.time() < deadline, "the KV index never settled"
        now = proxy.state.kv_index.num_hashes
        if now != last:
            last, since = now, loop.time()
        await asyncio.sleep(0.05)


@pytest.mark.slow  # see the docstring: flaky in the full suite, open
async def test_kv_aware_routing_finds_cached_prefixes(instance_factory: Any, proxies: Any,
                                                      http: Any) -> None:
    """KNOWN OPEN (2026-12-04): alone this measures 0.99+ (0.92+ with four CPU hogs), but in
    three of four fresh-clone runs of the whole suite the kv-aware rate fell to 0.62-0.88,
    near round robin's 0.59, as if the proxy lost the index for part of the warm rounds (a
    view gone stale until the next 10 s snapshot?). Not root-caused; it runs with the slow
    tests (``pytest -m slow tests/proxy``) and its failure message carries the index state.
    Later that day, with the mark dropped, it passed in two of two whole-suite runs (at
    e28a24b and 2f0e10d, same 2-core machine): the failures did not come back."""
    registration = f"tcp://127.0.0.1:{free_port()}"
    common = ["builtin:tiny-llama", "--device", "cpu", "--max-model-len", "512",
              "--proxy-address", registration]
    prefill_args = [*common, "--num-gpu-blocks-override", str(PREFILL_BLOCKS),
                    "--kv-transfer-config", _kv_config("kv_producer")]
    decode_args = [*common, "--kv-cache-memory-bytes", "16MiB",
                   "--kv-transfer-config", _kv_config("kv_consumer")]
    p0, p1, d = await asyncio.gather(*(asyncio.to_thread(instance_factory, args)
                                       for args in (prefill_args, prefill_args, decode_args)))
    prefills = [p0.url, p1.url]
    kv_proxy = await proxies(registration_address=registration, policy=PolicyName.KV_AWARE,
                             **TIMEOUTS)
    rr_proxy = await proxies(prefill_urls=tuple(prefills), decode_urls=(d.url,),
                             policy=PolicyName.ROUND_ROBIN, **TIMEOUTS)
    await _wait_registered(kv_proxy)
    rng = random.Random(0)
    # disjoint prefixes per policy: what the first run left cached never hits in the second;
    # each policy's rate is measured after its cold round (which no policy can make hit)
    rates = []
    for proxy, tag in ((rr_proxy, "R"), (kv_proxy, "K")):
        cold, warm = _workload(tag, rng)
        assert await _hit_rate(http, proxy.url, prefills, cold) == 0.0, tag
        await _index_settled(kv_proxy)
        rates.append(await _hit_rate(http, proxy.url, prefills, warm))
    rr_rate, kv_rate = rates
    print(f"prefill prefix-cache hit rate: kv_aware {kv_rate:.3f}, round_robin {rr_rate:.3f}")
    # 0.99+ on a quiet machine, 0.92-0.99 with four CPU hogs on the 2 cores: a warm request
    # can still be routed before the events of its prefix's blocks arrived (published every
    # 0.1 s), or after pool pressure evicted them. (At concurrency 4 a loaded machine also let
    # the load penalty win: requests outstanding longer, 0.62-0.88.)
    index = kv_proxy.state.kv_index
    assert kv_rate >= 0.85, (f"kv_aware {kv_rate:.3f} vs round robin {rr_rate:.3f}; index: "
                             f"fresh {index.num_fresh()}, hashes {index.num_hashes}, "
                             f"stale events {dict(index.stale_total)}")
    assert rr_rate <= 0.7 and kv_rate - rr_rate >= 0.25
    assert not kv_proxy.state.metrics.registration_dropped
    assert kv_proxy.state.kv_index.num_hashes > 0
    # stopped together, while the proxies still run (the factory would stop them one by one)
    await asyncio.gather(*(asyncio.to_thread(inst.stop) for inst in (p0, p1, d)))
