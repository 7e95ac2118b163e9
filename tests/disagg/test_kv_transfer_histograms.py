"""The per-transfer histograms' encoding in the connector's stats dict: sparse bucket counters
that sum over ranks key by key and read back as cumulative buckets."""

from __future__ import annotations

from disagg.common.kv_transfer_histograms import (
    BYTES_BUCKETS,
    DURATION_BUCKETS_S,
    is_histogram_key,
    observe_transfer,
    transfer_histograms,
)


def test_observations_read_back_cumulative_by_mode_and_role() -> None:
    stats: dict[str, float] = {"bytes_moved_total": 0.0}
    observe_transfer(stats, mode="write", role="producer", seconds=0.01, num_bytes=4096)
    observe_transfer(stats, mode="write", role="producer", seconds=100.0, num_bytes=2**40)
    observe_transfer(stats, mode="read", role="consumer", seconds=0.0, num_bytes=0)
    assert sum(is_histogram_key(k) for k in stats) == 10  # hit buckets and sums only
    by = {(h.name, h.mode, h.role): h for h in transfer_histograms(stats)}
    write = by[("duration_seconds", "write", "producer")]
    assert len(write.cumulative) == len(DURATION_BUCKETS_S) + 1
    assert dict(write.cumulative)[0.01] == 1  # a value on a bound falls in that bucket
    assert write.cumulative[-1] == (float("inf"), 2) and write.total == 100.01
    sizes = by[("bytes", "write", "producer")]
    assert len(sizes.cumulative) == len(BYTES_BUCKETS) + 1
    assert dict(sizes.cumulative)[4096.0] == 1 and sizes.cumulative[-2][1] == 1  # 1 TiB: +Inf
    assert by[("bytes", "read", "consumer")].cumulative[0] == (1024.0, 1)


def test_summed_dicts_add_up_and_foreign_keys_are_skipped() -> None:
    a: dict[str, float] = {}
    b: dict[str, float] = {}
    observe_transfer(a, mode="read", role="consumer", seconds=0.2, num_bytes=10)
    observe_transfer(b, mode="read", role="consumer", seconds=0.2, num_bytes=10)
    summed = {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a.keys() | b.keys()}
    summed.update({"hist:duration_seconds:read:consumer:99": 5.0, "hist:other:x:y:0": 1.0,
                   "hist:bytes:read": 1.0, "transfers_active": 3.0})
    (duration, size) = sorted(transfer_histograms(summed), key=lambda h: h.name, reverse=True)
    assert duration.cumulative[-1][1] == 2 and duration.total == 0.4
    assert size.cumulative[-1][1] == 2 and size.total == 20
