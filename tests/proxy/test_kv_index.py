"""The proxy's per-instance prefix-cache views: sequence gaps, snapshots, bounds, departures."""

from __future__ import annotations

from disagg.common.registration import KVEvents
from proxy.config import TransferMode
from proxy.kv_index import MAX_PREDICTED, KVIndex
from proxy.registry import Origin, Pool, Registry

URL = "http://127.0.0.1:9100"


def _msg(seq: int, changes: list[tuple[bool, int]] | None = None,
         snapshot: list[int] | None = None, engine_id: str = "e") -> KVEvents:
    return KVEvents(http_url=URL, engine_id=engine_id, seq=seq, changes=changes or [],
                    snapshot=snapshot)


def test_views_start_stale_and_a_snapshot_makes_them_fresh() -> None:
    index = KVIndex()
    index.apply(URL, _msg(0, [(True, 1)]))  # a delta before any snapshot: not usable
    assert not index.fresh(URL) and index.cached_blocks(URL, [1], 0.0) is None
    index.apply(URL, _msg(1, snapshot=[1, 2]))
    index.apply(URL, _msg(2, [(True, 3), (False, 1)]))
    assert index.fresh(URL) and index.num_hashes == 2
    assert index.cached_blocks(URL, [2, 3, 4], 0.0) == 2
    assert index.cached_blocks(URL, [1, 2], 0.0) == 0  # a prefix: stops at the first miss


def test_a_seq_gap_makes_the_view_stale_until_the_next_snapshot() -> None:
    index = KVIndex()
    index.apply(URL, _msg(0, snapshot=[1]))
    index.apply(URL, _msg(2, [(True, 2)]))  # seq 1 was lost
    assert not index.fresh(URL) and index.num_hashes == 0
    assert index.stale_total["gap"] == 1
    index.apply(URL, _msg(3, [(True, 3)]))  # still stale: deltas are ignored
    assert not index.fresh(URL)
    index.apply(URL, _msg(4, snapshot=[2, 3]))
    assert index.cached_blocks(URL, [2, 3], 0.0) == 2
    # a continued snapshot: its next chunk arrives as stored changes
    index.apply(URL, _msg(5, [(True, 4)]))
    assert index.cached_blocks(URL, [2, 3, 4], 0.0) == 3


def test_a_restarted_instance_starts_a_new_view() -> None:
    index = KVIndex()
    index.apply(URL, _msg(0, snapshot=[1, 2]))
    index.apply(URL, _msg(0, [(True, 5)], engine_id="e2"))  # new engine id, no snapshot yet
    assert not index.fresh(URL) and index.num_hashes == 0
    index.apply(URL, _msg(1, snapshot=[5], engine_id="e2"))
    assert index.cached_blocks(URL, [5], 0.0) == 1 and index.num_hashes == 1


def test_over_the_bound_the_least_recently_updated_view_is_dropped() -> None:
    index = KVIndex(max_hashes=5)
    a, b = "http://127.0.0.1:1", "http://127.0.0.1:2"
    index.apply(a, KVEvents(http_url=a, engine_id="a", seq=0, snapshot=[1, 2, 3]))
    index.apply(b, KVEvents(http_url=b, engine_id="b", seq=0, snapshot=[4, 5]))
    index.apply(b, KVEvents(http_url=b, engine_id="b", seq=1, changes=[(True, 6)]))
    assert not index.fresh(a) and index.fresh(b)  # a was updated longest ago
    assert index.num_hashes == 3 and index.stale_total["overflow"] == 1
    # one view alone over the bound drops itself
    index.apply(b, KVEvents(http_url=b, engine_id="b", seq=2, snapshot=list(range(10, 20))))
    assert not index.fresh(b) and index.num_hashes == 0


def test_an_instance_leaving_the_registry_is_forgotten() -> None:
    index = KVIndex()
    registry = Registry(TransferMode.READ, on_removed=index.forget)
    for url in (URL, "http://127.0.0.1:9200"):
        registry.add(url, Pool.PREFILL, Origin.DYNAMIC)
        index.apply(url, KVEvents(http_url=url, engine_id="e", seq=0, snapshot=[1, 2]))
    assert index.num_hashes == 4
    registry.remove(URL)  # a deregistration
    assert not index.fresh(URL) and index.num_hashes == 2
    other = registry.get("http://127.0.0.1:9200")
    assert other is not None
    other.expires_at_s = 0.0
    registry.expire(now_s=1.0)  # missed heartbeats
    assert index.num_hashes == 0 and index.num_fresh() == 0


def test_routed_prompts_count_as_cached_until_the_instance_answers_or_they_expire() -> None:
    index = KVIndex()
    index.apply(URL, _msg(0, snapshot=[1]))
    index.note_routed(URL, [1, 2, 3], expires_s=10.0)
    assert index.cached_blocks(URL, [1, 2, 3], now_s=5.0) == 3
    assert index.cached_blocks(URL, [1, 2, 3], now_s=10.0) == 1  # expired
    index.apply(URL, _msg(1, [(False, 2)]))  # the instance's word wins over the guess
    assert index.cached_blocks(URL, [1, 2, 3], now_s=5.0) == 1
    index.note_routed(URL, list(range(100, 100 + 2 * MAX_PREDICTED)), expires_s=10.0)
    assert index.cached_blocks(URL, [1, 3], now_s=5.0) == 1  # the oldest guesses went first
    index.note_routed("http://127.0.0.1:1", [7], expires_s=10.0)  # no view: nothing kept
    assert index.cached_blocks("http://127.0.0.1:1", [7], now_s=5.0) is None
