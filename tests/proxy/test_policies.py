"""Routing policies: spread, and preference for the less loaded instance."""

from __future__ import annotations

import collections
import random

from proxy.config import PolicyName
from proxy.policies import (
    LeastLoaded,
    PowerOfTwo,
    RoundRobin,
    decode_load,
    make_policy,
    prefill_load,
)
from proxy.registry import Instance, Origin, Pool


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
