"""Which data-parallel rank gets the next request: the least loaded, by requests and tokens.

    load(rank) = open requests + outstanding tokens / token_scale
    outstanding tokens of a request = prompt + max_tokens - tokens already streamed back

token_scale is one step's token budget (max_num_batched_tokens), so a step's worth of work
weighs like one more request. Ties rotate (round-robin from the last pick), so an idle instance
spreads even strictly sequential requests over every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class RankLoad:
    """What the frontend has sent to one rank and not seen finish."""

    num_requests: int = 0
    num_tokens: int = 0


def rank_loads(dp_size: int, open_requests: Iterable[tuple[int, int]]) -> list[RankLoad]:
    """Sum (rank, outstanding tokens) pairs of the open requests into per-rank loads."""
    loads = [RankLoad() for _ in range(dp_size)]
    for rank, num_tokens in open_requests:
        loads[rank].num_requests += 1
        loads[rank].num_tokens += max(num_tokens, 0)
    return loads


def pick_rank(loads: Sequence[RankLoad], token_scale: int, start: int) -> int:
    """The least loaded rank; among equals, the first at or after ``start``."""
    n = len(loads)
    scale = max(token_scale, 1)
    order = [(start + i) % n for i in range(n)]
    return min(order, key=lambda r: loads[r].num_requests + loads[r].num_tokens / scale)
