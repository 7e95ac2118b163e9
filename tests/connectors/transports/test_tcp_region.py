"""Region I/O: host zero-copy path and the staged (GPU) path, both exercised on CPU."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from connectors.transports.tcp_region import (
    HostRegionIO,
    Region,
    RegionIO,
    StagedRegionIO,
    byte_view,
    plan_fills,
)


def test_plan_fills_cuts_at_the_fill_size() -> None:
    fills = list(plan_fills([(0, 5), (100, 12), (200, 1)], 7))
    assert fills == [[(0, 5), (100, 2)], [(102, 7)], [(109, 3), (200, 1)]]
    assert all(sum(n for _, n in f) <= 7 for f in fills)
    assert list(plan_fills([], 7)) == []


def _transfer(sender: RegionIO, receiver: RegionIO, ranges_out: list[tuple[int, int]],
              ranges_in: list[tuple[int, int]]) -> None:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    thread = threading.Thread(target=sender.send_ranges, args=(a, ranges_out))
    thread.start()
    receiver.recv_ranges(b, ranges_in)
    thread.join(10)
    a.close()
    b.close()


@pytest.mark.parametrize("staging_bytes", [2, 7, 64, 1 << 20])
def test_staged_and_host_paths_agree(staging_bytes: int) -> None:
    src = torch.arange(1000, dtype=torch.int32)  # 4000 bytes, not uint8: bytes view matters
    dst = torch.zeros(1000, dtype=torch.int32)
    out_ranges = [(4, 40), (3000, 999), (0, 1)]
    in_ranges = [(100, 40), (2000, 999), (3999, 1)]
    _transfer(StagedRegionIO(src, staging_bytes), HostRegionIO(dst), out_ranges, in_ranges)
    _transfer(HostRegionIO(src), StagedRegionIO(dst, staging_bytes), [(1000, 500)],
              [(3000, 500)])
    s, d = byte_view(src), byte_view(dst)
    for (so, n), (do, _) in zip(out_ranges, in_ranges, strict=True):
        assert torch.equal(d[do:do + n], s[so:so + n])
    assert torch.equal(d[3000:3500], s[1000:1500])


def test_region_bounds_check_and_io_choice() -> None:
    region = Region(torch.zeros(10, dtype=torch.uint8), staging_bytes=4)
    assert not region.staged
    assert region.io_for_connection() is region.io_for_connection()  # shared, zero-copy
    assert region.check([0, 5], [5, 5]) is None
    assert "outside" in (region.check([6], [5]) or "")
    assert "2 offsets but 1 lengths" in (region.check([0, 1], [1]) or "")
    staged = Region(torch.zeros(10, dtype=torch.uint8), staging_bytes=4, force_staging=True)
    assert staged.io_for_connection() is not staged.io_for_connection()  # private buffers
    with pytest.raises(ValueError, match="contiguous"):
        byte_view(torch.zeros(4, 4)[:, 0])
