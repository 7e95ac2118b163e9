"""The transport factory and the availability probe used by ``disagg doctor``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from connectors.transports import (
    Segment,
    TransportError,
    available_transports,
    make_transport,
    merge_segments,
    transport_names,
)
from connectors.transports.base import merge_array
from connectors.transports.validation import check_array, check_segments


def test_every_transport_has_a_probe_answer() -> None:
    found = available_transports()
    assert set(found) == set(transport_names()) == {"tcp", "nixl", "ipc", "mori"}
    assert found["tcp"] is None
    for name, reason in found.items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_unknown_transport_name_is_a_clear_error() -> None:
    with pytest.raises(TransportError, match="unknown KV transport 'rdma'.*tcp, nixl, ipc, mori"):
        make_transport("rdma", agent_name="x")


def test_factory_builds_a_working_tcp_transport() -> None:
    transport = make_transport("tcp", agent_name="x", host="127.0.0.1", io_timeout_s=2.0)
    try:
        assert transport.name == "tcp"
        transport.register_region(torch.zeros(16, dtype=torch.uint8))
        assert isinstance(transport.descriptor(), bytes)
        with pytest.raises(TransportError, match="already registered"):
            transport.register_region(torch.zeros(16, dtype=torch.uint8))
    finally:
        transport.close()


def test_merge_segments_joins_runs_contiguous_on_both_sides() -> None:
    segs = [Segment(8, 108, 8), Segment(0, 100, 8), Segment(16, 200, 8)]
    assert merge_segments(segs) == [Segment(0, 100, 16), Segment(16, 200, 8)]


def test_merge_array_and_check_array_agree_with_the_list_versions() -> None:
    gen = np.random.default_rng(0)
    for _ in range(200):
        n = int(gen.integers(0, 12))
        starts = gen.integers(0, 6, size=(n, 2)) * 8
        segs = [Segment(int(a), int(b), int(k)) for (a, b), k in
                zip(starts, gen.integers(0, 3, size=n) * 8)]
        merged = merge_array(segs)
        assert [Segment(*row) for row in merged.tolist()] == merge_segments(segs)
        rows = np.array(segs, dtype=np.int64).reshape(-1, 3)  # a batch given as rows
        assert np.array_equal(merge_array(rows), merged)
        assert np.array_equal(merge_array(merged), merged)  # merged rows pass through as they are
        assert merge_segments(rows) == merge_segments(segs)
        for local_bytes, remote_bytes in ((64, 64), (40, 48), (8, 8)):
            assert (check_array(merged, local_bytes, remote_bytes)
                    == check_segments(merge_segments(segs), local_bytes, remote_bytes))
    negative = merge_array([Segment(0, 0, 8), Segment(16, -8, 8)])
    assert check_array(negative, 64, 64) == check_segments([Segment(16, -8, 8)], 64, 64)
