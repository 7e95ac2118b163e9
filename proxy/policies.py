"""Routing policies: pick one instance out of a pool's healthy candidates.

Load is what the proxy itself has outstanding on each instance (requests and tokens): exact
for a single proxy, and free to read. Prefill cost grows with prompt tokens, decode cost with
the number of sequences, so the pools rank load differently. ``kv_aware`` also weighs what
each instance's prefix cache already holds of the prompt (proxy/kv_index.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from disagg.common.block_hash import block_hashes, salted_seed
from proxy.config import PolicyName
from proxy.kv_index import PREDICTED_TTL_S, KVIndex
from proxy.registry import Instance, Pool

LoadKey = Callable[[Instance], tuple[int, int]]


def prefill_load(inst: Instance) -> tuple[int, int]:
    """Prefill instances: outstanding prompt tokens first, then requests."""
    return inst.outstanding_tokens, inst.outstanding_requests


def decode_load(inst: Instance) -> tuple[int, int]:
    """Decode instances: outstanding sequences first, then their tokens."""
    return inst.outstanding_requests, inst.outstanding_tokens


def load_key(pool: Pool) -> LoadKey:
    """The load ordering used for ``pool``."""
    return prefill_load if pool is Pool.PREFILL else decode_load


class Policy(Protocol):
    """Chooses an instance; ``candidates`` is never empty."""

    def choose(self, candidates: Sequence[Instance],
               prompt_token_ids: Sequence[int] = (), cache_salt: str | None = None) -> Instance:
        """The instance the next request (with this prompt and cache salt) goes to."""
        ...


class RoundRobin:
    """Each candidate in turn."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[Instance],
               prompt_token_ids: Sequence[int] = (), cache_salt: str | None = None) -> Instance:
        """The next candidate in rotation."""
        inst = candidates[self._next % len(candidates)]
        self._next += 1
        return inst


class LeastLoaded:
    """The candidate with the least outstanding load; ties rotate so idle pools still spread."""

    def __init__(self, key: LoadKey) -> None:
        self._key = key
        self._start = 0

    def choose(self, candidates: Sequence[Instance],
               prompt_token_ids: Sequence[int] = (), cache_salt: str | None = None) -> Instance:
        """The least-loaded candidate, scanning from a rotating start."""
        n = len(candidates)
        start = self._start % n
        self._start += 1
        rotated = [candidates[(start + i) % n] for i in range(n)]
        return min(rotated, key=self._key)


class PowerOfTwo:
    """Two random candidates, the less loaded one wins (cheap, avoids herding on stale load)."""

    def __init__(self, key: LoadKey, rng: random.Random | None = None) -> None:
        self._key = key
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Instance],
               prompt_token_ids: Sequence[int] = (), cache_salt: str | None = None) -> Instance:
        """The lighter of two random picks."""
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(list(candidates), 2)
        return second if self._key(second) < self._key(first) else first


LOAD_WEIGHT = 0.25
"""The share of the prompt one more outstanding request on an instance costs: an instance
holding the whole prompt wins until it has 1 / LOAD_WEIGHT more requests than an idle one.
(Requests, not their tokens: the cached part of those is cheap, and the proxy cannot tell.)"""


class KVAware:
    """The candidate whose prefix cache saves the most work:

        score = cached prompt tokens - LOAD_WEIGHT * prompt tokens * outstanding requests
        ties: least loaded

    cached = the longest prefix of the prompt's full blocks the instance holds (not counting
    the last prompt token, which an engine always computes). When no candidate holds any of
    it, or none has a fresh view (static instances publish nothing), it is least_loaded. The
    chosen instance's view then counts the prompt's blocks as cached for a moment, so a burst
    of one new prefix lands on one instance."""

    def __init__(self, index: KVIndex, key: LoadKey, load_weight: float = LOAD_WEIGHT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._index = index
        self._key = key
        self._load_weight = load_weight
        self._clock = clock
        self._least_loaded = LeastLoaded(key)

    def choose(self, candidates: Sequence[Instance],
               prompt_token_ids: Sequence[int] = (), cache_salt: str | None = None) -> Instance:
        """The best-scoring candidate; least_loaded without cache information."""
        now_s = self._clock()
        chains = _PromptChains(prompt_token_ids, cache_salt)
        cached: dict[str, int] = {}
        for inst in candidates:
            chain = chains.of(inst) if self._index.fresh(inst.url) else None
            if chain is not None:
                lookup = chain.hashes[:(len(prompt_token_ids) - 1) // chain.block_size]
                blocks = self._index.cached_blocks(inst.url, lookup, now_s) or 0
                cached[inst.url] = blocks * chain.block_size
        if not any(cached.values()):
            best = self._least_loaded.choose(candidates)
        else:
            penalty = self._load_weight * len(prompt_token_ids)
            best = min(candidates, key=lambda i: (
                penalty * i.outstanding_requests - cached.get(i.url, 0), self._key(i)))
        if best.url in cached:
            chain = chains.of(best)
            assert chain is not None
            self._index.note_routed(best.url, chain.hashes, now_s + PREDICTED_TTL_S)
        return best


@dataclass(frozen=True, slots=True)
class _Chain:
    block_size: int
    hashes: list[int]


class _PromptChains:
    """One prompt's block hash chains, computed once per (block size, seed)."""

    def __init__(self, prompt_token_ids: Sequence[int], cache_salt: str | None) -> None:
        self._tokens = prompt_token_ids
        self._salt = cache_salt
        self._memo: dict[tuple[int, int], _Chain] = {}

    def of(self, inst: Instance) -> _Chain | None:
        """The chain of the prompt's full blocks as ``inst`` hashes them; None when it keeps
        no prefix cache (or has not said how it hashes)."""
        info = inst.info
        if info is None or info.hash_seed is None or not info.block_size:
            return None
        key = (info.block_size, info.hash_seed)
        if key not in self._memo:
            seed = salted_seed(info.hash_seed, self._salt)
            self._memo[key] = _Chain(info.block_size,
                                     block_hashes(self._tokens, info.block_size, seed))
        return self._memo[key]


def make_policy(name: PolicyName, pool: Pool, rng: random.Random | None = None,
                index: KVIndex | None = None) -> Policy:
    """A fresh policy object for one pool (``kv_aware`` reads ``index``)."""
    if name is PolicyName.ROUND_ROBIN:
        return RoundRobin()
    if name is PolicyName.LEAST_LOADED:
        return LeastLoaded(load_key(pool))
    if name is PolicyName.KV_AWARE:
        return KVAware(index if index is not None else KVIndex(), load_key(pool))
    return PowerOfTwo(load_key(pool), rng)
