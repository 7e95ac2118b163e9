"""Routing policies: pick one instance out of a pool's healthy candidates.

Load is what the proxy itself has outstanding on each instance (requests and tokens): exact
for a single proxy, and free to read. Prefill cost grows with prompt tokens, decode cost with
the number of sequences, so the pools rank load differently.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from proxy.config import PolicyName
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

    def choose(self, candidates: Sequence[Instance]) -> Instance:
        """The instance the next request goes to."""
        ...


class RoundRobin:
    """Each candidate in turn."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[Instance]) -> Instance:
        """The next candidate in rotation."""
        inst = candidates[self._next % len(candidates)]
        self._next += 1
        return inst


class LeastLoaded:
    """The candidate with the least outstanding load; ties rotate so idle pools still spread."""

    def __init__(self, key: LoadKey) -> None:
        self._key = key
        self._start = 0

    def choose(self, candidates: Sequence[Instance]) -> Instance:
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

    def choose(self, candidates: Sequence[Instance]) -> Instance:
        """The lighter of two random picks."""
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(list(candidates), 2)
        return second if self._key(second) < self._key(first) else first


def make_policy(name: PolicyName, pool: Pool, rng: random.Random | None = None) -> Policy:
    """A fresh policy object for one pool."""
    if name is PolicyName.ROUND_ROBIN:
        return RoundRobin()
    if name is PolicyName.LEAST_LOADED:
        return LeastLoaded(load_key(pool))
    return PowerOfTwo(load_key(pool), rng)
