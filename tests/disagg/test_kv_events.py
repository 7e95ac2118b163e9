"""The instance-wide prefix-cache view over DP ranks and the KVEvents frames published from it."""

from __future__ import annotations

from disagg.common.protocol import KVCacheEvents
from disagg.common.registration import (
    MAX_KV_EVENTS_PER_MESSAGE,
    MAX_MESSAGE_BYTES,
    decode_message,
    encode_message,
)
from disagg.server.kv_events import InstanceKVView, KVPublish, KVPublisher


def _changes(*pairs: tuple[bool, int]) -> KVCacheEvents:
    return KVCacheEvents(changes=list(pairs))


def test_a_hash_is_published_when_the_first_rank_stores_it_and_the_last_evicts_it() -> None:
    view = InstanceKVView(dp_size=2)
    view.apply(0, _changes((True, 1), (True, 2)))
    view.apply(1, _changes((True, 2), (True, 3)))
    assert view.take() == KVPublish([(True, 1), (True, 2), (True, 3)])
    assert view.take() is None  # nothing new
    assert view.ranks_holding(2) == 2
    view.apply(0, _changes((False, 2), (False, 1)))  # rank 1 still holds 2
    view.apply(1, _changes((False, 9)))  # never held: no event
    assert view.take() == KVPublish([(False, 1)])
    view.apply(1, _changes((False, 2)))
    assert view.take() == KVPublish([(False, 2)])
    assert len(view) == 1 and view.ranks_holding(3) == 1


def test_a_rank_snapshot_replaces_only_that_ranks_hashes() -> None:
    view = InstanceKVView(dp_size=2)
    view.apply(0, _changes((True, 1), (True, 2)))
    view.apply(1, _changes((True, 1)))
    view.take()
    # rank 0 lost events: it now holds {2, 4}; 1 stays (rank 1 has it)
    view.apply(0, KVCacheEvents(dropped=7, snapshot=[2, 4]))
    assert view.take() == KVPublish([(True, 4)])
    assert view.ranks_holding(1) == 1 and view.ranks_holding(2) == 1
    view.apply(1, KVCacheEvents(dropped=1, snapshot=[]))
    assert view.take() == KVPublish([(False, 1)])


def test_overflow_drops_the_pending_changes_for_a_snapshot() -> None:
    view = InstanceKVView(dp_size=2, max_pending=4)
    view.apply(0, _changes(*[(True, h) for h in range(3)]))
    view.apply(1, _changes(*[(True, h) for h in range(10, 14)]))  # the 5th change overflows
    view.apply(0, _changes((False, 0)))
    pub = view.take()
    assert pub is not None and pub.changes == []
    assert sorted(pub.snapshot or []) == [1, 2, 10, 11, 12, 13]
    assert view.take() is None  # back to deltas
    view.apply(0, _changes((True, 5)))
    assert view.take() == KVPublish([(True, 5)])


def test_publisher_numbers_chunks_snapshots_first_and_after_a_lost_send() -> None:
    view = InstanceKVView(dp_size=1)
    pub = KVPublisher(view, "http://127.0.0.1:9", "e", snapshot_interval_s=10.0)
    n = MAX_KV_EVENTS_PER_MESSAGE
    view.apply(0, _changes(*[(True, h) for h in range(n + 5)]))
    first = pub.messages(now_s=0.0)  # the first call always sends a snapshot
    assert [m.seq for m in first] == [0, 1]
    assert first[0].snapshot is not None and len(first[0].snapshot) == n
    assert first[1].snapshot is None and len(first[1].changes) == 5
    assert all(stored for stored, _ in first[1].changes)
    for msg in first:
        frame = encode_message(msg)
        assert len(frame) < MAX_MESSAGE_BYTES and decode_message(frame) == msg
    assert pub.messages(now_s=1.0) == []  # nothing changed, no snapshot due
    view.apply(0, _changes((False, 3)))
    delta = pub.messages(now_s=2.0)
    assert [(m.seq, m.changes, m.snapshot) for m in delta] == [(2, [(False, 3)], None)]
    pub.lost()
    again = pub.messages(now_s=3.0)
    assert again[0].seq == 3 and again[0].snapshot is not None
    periodic = pub.messages(now_s=13.5)  # snapshot_interval_s after the last one
    assert periodic[0].snapshot is not None and pub.messages(now_s=14.0) == []
