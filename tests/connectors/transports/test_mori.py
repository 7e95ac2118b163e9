"""mori transport, run against ``fake_mori`` (same API as ``mori.io``, host memory)."""

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
    make_transport,
)

MakeLocal = Callable[..., Transport]
SpawnPeer = Callable[..., PeerProcess]
FAKE = {"api_module": "fake_mori"}


def test_read_and_write_with_peer_process_are_byte_exact(make_local: MakeLocal,
                                                          spawn_peer: SpawnPeer) -> None:
    peer = spawn_peer("mori", options=FAKE)
    check_read(make_local("mori", **FAKE), peer)
    check_write(make_local("mori", backend="xgmi", **FAKE), peer, peer_fill="pattern1")


def test_dead_peer_fails_fast(make_local: MakeLocal, spawn_peer: SpawnPeer) -> None:
    error = check_dead_peer(make_local("mori", **FAKE), spawn_peer("mori", options=FAKE),
                            bound_s=5.0)
    assert "ERR_RDMA_OP" in error


def test_in_process_pair_merging_and_errors(make_local: MakeLocal) -> None:
    a, b = make_local("mori", **FAKE), make_local("mori", **FAKE)
    ra, rb = torch.zeros(4096, dtype=torch.uint8), torch.arange(4096).to(torch.uint8)
    a.register_region(ra)
    b.register_region(rb)
    a.add_peer("b", b.descriptor())
    a.add_peer("b", b.descriptor())  # idempotent
    adjacent = [Segment(i * 64, i * 64, 64) for i in range(16)]
    assert wait_done(a, a.post(TransferOp.READ, "b", adjacent)) == ("done", None)
    assert torch.equal(ra[:1024], rb[:1024])
    assert int(ra[1024:].count_nonzero()) == 0
    with pytest.raises(ValueError, match="past the peer's region"):
        a.post(TransferOp.READ, "b", [Segment(0, 4000, 100)])
    status, error = wait_done(a, a.post(TransferOp.WRITE, "ghost", [Segment(0, 0, 1)]))
    assert status == "failed" and "unknown peer" in (error or "")
    with pytest.raises(TransportError, match="not a mori descriptor"):
        a.add_peer("junk", b"\x01")
    a.remove_peer("b")
    assert wait_done(a, a.post(TransferOp.READ, "b", adjacent))[0] == "failed"


def test_bad_backend_and_missing_real_mori_are_clear() -> None:
    with pytest.raises(TransportError, match="'rdma' or 'xgmi'"):
        make_transport("mori", agent_name="x", backend="carrier-pigeon", api_module="fake_mori")
    reason = available_transports()["mori"]
    try:
        import mori.io  # noqa: F401
    except ImportError:
        assert reason is not None and "mori" in reason
        with pytest.raises(TransportError, match="mori.io is not importable"):
            make_transport("mori", agent_name="x")
    else:
        assert reason is None
