"""Heterogeneous TP routes and their byte rows, checked by moving real bytes: a full KV cache is
sharded into P's ranks as each rank holds it, the routes' rows are applied as one-sided copies
between those shards, and every D rank must end up with exactly the heads it holds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from connectors.pd_heads import RankGeometry, route_rows, routes
from disagg.models.parallel import kv_head_range

TP = (1, 2, 4, 8)


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize(("p_tp", "d_tp"), list(itertools.product(TP, TP)))
def test_every_consumer_head_arrives_once_from_a_holder(heads: int, p_tp: int,
                                                        d_tp: int) -> None:
    got: dict[tuple[int, int], int] = {}
    for r in routes(heads, p_tp, d_tp):
        p_start, p_n = kv_head_range(heads, p_tp, r.producer_rank)
        d_start, d_n = kv_head_range(heads, d_tp, r.consumer_rank)
        assert r.num_heads >= 1
        assert r.producer_head + r.num_heads <= p_n and r.consumer_head + r.num_heads <= d_n
        for k in range(r.num_heads):
            global_p = p_start + r.producer_head + k
            global_d = d_start + r.consumer_head + k
            assert global_p == global_d  # the same head on both sides
            key = (r.consumer_rank, global_d)
            got[key] = got.get(key, 0) + 1
    want = set()
    for c in range(d_tp):
        start, n = kv_head_range(heads, d_tp, c)
        want |= {(c, h) for h in range(start, start + n)}
    assert set(got) == want
    assert all(v == 1 for v in got.values())  # one copy per consumer rank and head


def test_replicating_producer_spreads_reads_over_replicas() -> None:
    # P tp=4 over 2 heads: p0,p1 hold head 0, p2,p3 head 1; D tp=2 pulls each head once
    rs = routes(2, 4, 2)
    assert [(r.producer_rank, r.consumer_rank) for r in rs] == [(0, 0), (3, 1)]
    # D tp=4 replicates: every D rank gets its head; P tp=2 serves each twice
    rs = routes(2, 2, 4)
    assert [(r.producer_rank, r.consumer_rank) for r in rs] == [(0, 0), (0, 1), (1, 2), (1, 3)]


def _shard(full: np.ndarray, heads: int, tp: int, rank: int) -> np.ndarray:
    start, n = kv_head_range(heads, tp, rank)
    return np.ascontiguousarray(full[:, :, :, :, start:start + n, :])


def _apply(rows: np.ndarray, dst: np.ndarray, src: np.ndarray) -> None:
    d, s = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
    for a, b, n in rows:
        d[a:a + n] = s[b:b + n]


@pytest.mark.parametrize(("p_tp", "d_tp"), [(1, 2), (2, 1), (2, 4), (4, 2), (1, 4), (4, 1),
                                            (2, 2), (8, 1)])
@pytest.mark.parametrize("mode", ["read", "write"])
def test_rows_move_exactly_each_ranks_heads(p_tp: int, d_tp: int, mode: str) -> None:
    layers, bs, heads, dim, blocks = 2, 4, 2, 3, 6
    rng = np.random.default_rng(0)
    full = rng.standard_normal((blocks, layers, 2, bs, heads, dim)).astype(np.float32)
    p_blocks, d_blocks = [4, 1, 2], [0, 5, 3]
    p_shards = [_shard(full, heads, p_tp, r) for r in range(p_tp)]
    d_shards = [np.zeros_like(_shard(full, heads, d_tp, r)) for r in range(d_tp)]
    geo = {tp: RankGeometry(layers, bs, kv_head_range(heads, tp, 0)[1], dim * 4)
           for tp in (p_tp, d_tp)}
    for r in routes(heads, p_tp, d_tp):
        if mode == "read":  # D posts: local = its rank, remote = P's
            rows = route_rows(d_blocks, p_blocks, geo[d_tp], geo[p_tp], r.consumer_head,
                              r.producer_head, r.num_heads)
            _apply(rows, d_shards[r.consumer_rank], p_shards[r.producer_rank])
        else:  # P posts: local = its rank, remote = D's; a WRITE copies local -> remote
            rows = route_rows(p_blocks, d_blocks, geo[p_tp], geo[d_tp], r.producer_head,
                              r.consumer_head, r.num_heads)
            _apply(rows[:, [1, 0, 2]], d_shards[r.consumer_rank], p_shards[r.producer_rank])
    for c in range(d_tp):
        want = _shard(full, heads, d_tp, c)
        for pb, db in zip(p_blocks, d_blocks, strict=True):
            np.testing.assert_array_equal(d_shards[c][db], want[pb])
        untouched = [b for b in range(blocks) if b not in d_blocks]
        assert not d_shards[c][untouched].any()


def test_same_tp_moves_whole_blocks_in_merged_runs() -> None:
    geo = RankGeometry(4, 16, 2, 64)
    rows = route_rows([3, 4, 5], [7, 8, 9], geo, geo, 0, 0, 2)
    assert rows.tolist() == [[3 * geo.block_bytes, 7 * geo.block_bytes, 3 * geo.block_bytes]]


def test_rows_refuse_block_ids_that_would_wrap() -> None:
    geo = RankGeometry(4, 16, 2, 64)
    with pytest.raises(ValueError, match="out of range"):
        route_rows([2**60], [1], geo, RankGeometry(4, 16, 1, 64), 0, 0, 1)
