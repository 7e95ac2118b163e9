"""Routing policies: spread, and preference for the less loaded instance."""

from __future__ import annotations

import collections
import itertools
import random

from disagg.common.block_hash import block_hashes, model_seed, salted_seed
from disagg.common.registration import InstanceInfo, KVEvents, KVRole
from proxy.config import PolicyName
from proxy.kv_index import KVIndex
from proxy.policies import (
    KVAware,
    LeastLoaded,
    PowerOfTwo,
    RoundRobin,
    decode_load,
    make_policy,
    prefill_load,
)
from proxy.registry import Instance, Origin, Pool

BLOCK = 4
SEED = model_seed("builtin:tiny-llama")


def _pool(n: int, pool: Pool = Pool.DECODE) -> list[Instance]:
    return [Instance(url=f"http://127.0.0.1:{9000 + i}", pool=pool, origin=Origin.STATIC)
            for i in range(n)]


def test_round_robin_spreads_evenly() -> None:
    insts = _pool(3)
    policy = RoundRobin()
    picks = collections.Counter(policy.choose(insts).url for _ in range(30))
    assert sorted(picks.values()) == [10, 10, 10]


def test_least_loaded_spreads_an_idle_pool_and_avoids_busy_instances() -> None:
    insts = _pool(4)
    policy = LeastLoaded(decode_load)
    idle_picks = collections.Counter(policy.choose(insts).url for _ in range(40))
    assert sorted(idle_picks.values()) == [10, 10, 10, 10]
    insts[0].outstanding_requests, insts[1].outstanding_requests = 5, 3
    insts[2].outstanding_requests, insts[3].outstanding_requests = 1, 2
    assert {policy.choose(insts).url for _ in range(8)} == {insts[2].url}


def test_least_loaded_fills_the_pool_evenly_when_requests_stay_outstanding() -> None:
    insts = _pool(3)
    policy = LeastLoaded(decode_load)
    for _ in range(9):
        policy.choose(insts).outstanding_requests += 1
    assert [i.outstanding_requests for i in insts] == [3, 3, 3]


def test_prefill_load_ranks_by_tokens_decode_load_by_requests() -> None:
    a, b = _pool(2)
    a.outstanding_tokens, a.outstanding_requests = 100, 1
    b.outstanding_tokens, b.outstanding_requests = 10, 4
    assert min([a, b], key=prefill_load) is b
    assert min([a, b], key=decode_load) is a


def test_power_of_two_prefers_the_lighter_and_still_spreads() -> None:
    insts = _pool(4)
    policy = PowerOfTwo(decode_load, random.Random(7))
    picks = collections.Counter(policy.choose(insts).url for _ in range(400))
    assert set(picks) == {i.url for i in insts}
    insts[0].outstanding_requests = 100
    loaded_picks = [policy.choose(insts) for _ in range(200)]
    assert insts[0] not in loaded_picks
    assert policy.choose(insts[:1]) is insts[0]


def test_make_policy_builds_each_kind() -> None:
    assert isinstance(make_policy(PolicyName.ROUND_ROBIN, Pool.PREFILL), RoundRobin)
    assert isinstance(make_policy(PolicyName.LEAST_LOADED, Pool.PREFILL), LeastLoaded)
    assert isinstance(make_policy(PolicyName.POWER_OF_TWO, Pool.DECODE), PowerOfTwo)
    assert isinstance(make_policy(PolicyName.KV_AWARE, Pool.PREFILL, index=KVIndex()), KVAware)


def _kv_pool(n: int, index: KVIndex, holding: dict[int, list[int]]) -> list[Instance]:
    """``n`` registered prefill instances; instance i's cache holds the hashes holding[i]."""
    insts = _pool(n, Pool.PREFILL)
    for i, inst in enumerate(insts):
        inst.info = InstanceInfo(role=KVRole.PRODUCER, engine_id=f"e{i}", http_url=inst.url,
                                 max_model_len=512, block_size=BLOCK, hash_seed=SEED)
        index.apply(inst.url, KVEvents(http_url=inst.url, engine_id=f"e{i}", seq=0,
                                       snapshot=holding.get(i, [])))
    return insts


def _clock() -> float:
    return 100.0


def test_kv_aware_picks_the_longest_cached_prefix() -> None:
    prompt = list(range(1, 4 * BLOCK + 2))  # 4 full blocks and one token
    chain = block_hashes(prompt, BLOCK, SEED)
    index = KVIndex()
    insts = _kv_pool(3, index, {0: chain[:1], 1: chain[:3], 2: chain[1:4]})  # 2: no prefix
    ticks = itertools.count(0.0, 10.0)  # each choice's guesses expired by the next one
    policy = KVAware(index, prefill_load, clock=lambda: next(ticks))
    assert policy.choose(insts, prompt) is insts[1]
    # a prompt of exactly 4 blocks: the engine computes its last token, so only 3 count
    index.apply(insts[0].url, KVEvents(http_url=insts[0].url, engine_id="e0", seq=1,
                                       changes=[(True, h) for h in chain]))
    insts[0].outstanding_tokens = 1
    assert policy.choose(insts, prompt[:4 * BLOCK]) is insts[1]  # 3 blocks each: less loaded
    assert policy.choose(insts, prompt) is insts[0]  # 4 blocks


def test_kv_aware_hashes_a_salted_prompt_as_the_instances_do() -> None:
    prompt = list(range(1, 4 * BLOCK + 2))
    salted = block_hashes(prompt, BLOCK, salted_seed(SEED, "tenant-a"))
    index = KVIndex()
    insts = _kv_pool(2, index, {0: block_hashes(prompt, BLOCK, SEED), 1: salted})
    policy = KVAware(index, prefill_load, clock=_clock)
    assert policy.choose(insts, prompt, "tenant-a") is insts[1]
    assert policy.choose(insts, prompt) is insts[0]
    insts[0].outstanding_tokens = insts[1].outstanding_tokens = 0
    first = policy.choose(insts, prompt, "tenant-b")  # no holder: least loaded, and then...
    assert policy.choose(insts, prompt, "tenant-b") is first  # ...its chain is expected there
    assert policy.choose(insts, prompt, "tenant-a") is insts[1]


def test_kv_aware_load_penalty_and_ties() -> None:
    prompt = list(range(1, 4 * BLOCK + 2))
    chain = block_hashes(prompt, BLOCK, SEED)
    index = KVIndex()
    insts = _kv_pool(3, index, {0: chain, 1: chain})
    policy = KVAware(index, prefill_load, clock=_clock)
    insts[0].outstanding_tokens = 50  # equal cache: the less loaded wins
    assert policy.choose(insts, prompt) is insts[1]
    # a full hit wins until its instance has about 1 / LOAD_WEIGHT = 4 more requests
    insts[0].outstanding_requests = insts[1].outstanding_requests = 3
    assert policy.choose(insts, prompt) is insts[1]
    insts[0].outstanding_requests = insts[1].outstanding_requests = 5
    assert policy.choose(insts, prompt) is insts[2]


def test_kv_aware_without_cache_information_is_least_loaded() -> None:
    prompt = list(range(1, 4 * BLOCK + 2))
    index = KVIndex()
    insts = _kv_pool(3, index, {})  # fresh views, none holding the prompt
    policy = KVAware(index, prefill_load, clock=_clock)
    picks = collections.Counter(policy.choose(insts, list(range(50 + i, 70 + i))).url
                                for i in range(30))
    assert sorted(picks.values()) == [10, 10, 10]  # new prefixes spread like least_loaded
    static = _pool(2, Pool.PREFILL)  # never publish: no view at all
    static[0].outstanding_tokens = 10
    assert {policy.choose(static, prompt).url for _ in range(4)} == {static[1].url}
    assert policy.choose(insts, []) in insts  # no prompt ids (nothing to hash)


def test_kv_aware_keeps_a_burst_of_one_new_prefix_together() -> None:
    index = KVIndex()
    insts = _kv_pool(2, index, {})
    policy = KVAware(index, prefill_load, clock=_clock)
    prefix = list(range(1, 4 * BLOCK + 1))
    first = policy.choose(insts, [*prefix, 7])  # nobody holds it: least loaded
    # the instance has not published it yet; the proxy remembers where it sent it
    assert {policy.choose(insts, [*prefix, t]).url for t in range(8, 12)} == {first.url}
