"""Rank choice: least loaded by requests and tokens, ties rotate."""

from disagg.dp.balance import RankLoad, pick_rank, rank_loads


def test_idle_ranks_rotate() -> None:
    loads = rank_loads(3, [])
    picks, start = [], 0
    for _ in range(6):
        r = pick_rank(loads, 2048, start)
        picks.append(r)
        start = (r + 1) % 3
    assert picks == [0, 1, 2, 0, 1, 2]


def test_requests_and_tokens_both_count() -> None:
    loads = rank_loads(3, [(0, 10), (0, 10), (1, 4000), (2, 10)])
    assert [(x.num_requests, x.num_tokens) for x in loads] == [(2, 20), (1, 4000), (1, 10)]
    assert pick_rank(loads, 2048, 0) == 2  # rank 1 has one request but two steps of tokens
    assert pick_rank([RankLoad(1, 0), RankLoad(0, 5000)], 1000, 0) == 0
    assert rank_loads(1, [(0, -5)])[0].num_tokens == 0  # over-long outputs never go negative
