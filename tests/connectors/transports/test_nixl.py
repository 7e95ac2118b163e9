"""nixl transport on host memory between two processes (UCX); skipped if nixl is missing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transport_harness import PeerProcess, check_dead_peer, check_read, check_write, wait_done

from connectors.transports import (
    Segment,
    TransferOp,
    Transport,
    TransportError,
    available_transports,
)

_REASON = available_transports()["nixl"]
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"nixl unavailable: {_REASON}")

MakeLocal = Callable[..., Transport]
SpawnPeer = Callable[..., PeerProcess]


def test_read_and_write_with_peer_process_are_byte_exact(make_local: MakeLocal,
                                                          spawn_peer: SpawnPeer) -> None:
    peer = spawn_peer("nixl")
    check_read(make_local("nixl"), peer)
    check_write(make_local("nixl"), peer, peer_fill="pattern1")


def test_dead_peer_fails_without_hanging(make_local: MakeLocal, spawn_peer: SpawnPeer) -> None:
    error = check_dead_peer(make_local("nixl", transfer_timeout_s=5.0), spawn_peer("nixl"),
                            bound_s=8.0)
    assert "peer 'peer'" in error


def test_in_process_pair_and_bad_arguments(make_local: MakeLocal) -> None:
    a, b = make_local("nixl"), make_local("nixl")
    ra, rb = torch.zeros(8192, dtype=torch.uint8), torch.arange(8192).to(torch.uint8)
    a.register_region(ra)
    b.register_region(rb)
    a.add_peer("b", b.descriptor())
    a.add_peer("b", b.descriptor())  # idempotent
    segs = [Segment(i, 8191 - i, 1) for i in range(0, 64, 2)]  # 1-byte, reversed pieces
    assert wait_done(a, a.post(TransferOp.READ, "b", segs)) == ("done", None)
    assert all(int(ra[i]) == int(rb[8191 - i]) for i in range(0, 64, 2))
    assert int(ra[1:64:2].count_nonzero()) == 0
    with pytest.raises(ValueError, match="past the local region"):
        a.post(TransferOp.WRITE, "b", [Segment(8000, 0, 500)])
    status, error = wait_done(a, a.post(TransferOp.READ, "ghost", [Segment(0, 0, 1)]))
    assert status == "failed" and "unknown peer" in (error or "")
    with pytest.raises(TransportError, match="not a nixl descriptor"):
        a.add_peer("junk", b"junk")
    a.remove_peer("b")
    status, _ = wait_done(a, a.post(TransferOp.READ, "b", segs))
    assert status == "failed"
