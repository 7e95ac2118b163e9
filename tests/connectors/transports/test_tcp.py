"""tcp transport: two processes byte-exact, merging, splitting, failures, bounded threads."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import torch
from transport_harness import (
    BLOCK_BYTES,
    PeerProcess,
    check_dead_peer,
    check_read,
    check_write,
    pattern,
    wait_done,
)

from connectors.transports import (
    Segment,
    TransferOp,
    TransferStatus,
    Transport,
    TransportError,
    available_transports,
    tcp_peer,
)
from connectors.transports.tcp import split_segments
from connectors.transports.tcp_wire import TcpRequest, decode_descriptor, encode_descriptor

MakeLocal = Callable[..., Transport]
SpawnPeer = Callable[..., PeerProcess]


def _pair(make_local: MakeLocal, nbytes: int = 1 << 20,
          **options: Any) -> tuple[Transport, Transport, torch.Tensor, torch.Tensor]:
    """Two transports in this process: ``a`` (zeros) reads from / writes to ``b`` (pattern)."""
    a, b = make_local("tcp", **options), make_local("tcp", **options)
    ra, rb = torch.zeros(nbytes, dtype=torch.uint8), pattern(nbytes, seed=1)
    a.register_region(ra)
    b.register_region(rb)
    a.add_peer("b", b.descriptor())
    return a, b, ra, rb


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A listener that accepts connections and never answers: a stalled peer, in-process."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def _stalled_descriptor(transport: Transport, port: int) -> bytes:
    """This transport's own descriptor, pointed at a port where nobody answers."""
    return encode_descriptor(msgspec.structs.replace(decode_descriptor(transport.descriptor()),
                                                     port=port))


def test_tcp_is_always_available() -> None:
    assert available_transports()["tcp"] is None


def test_read_and_write_with_peer_process_are_byte_exact(make_local: MakeLocal,
                                                          spawn_peer: SpawnPeer) -> None:
    peer = spawn_peer("tcp")
    check_read(make_local("tcp"), peer)
    check_write(make_local("tcp"), peer, peer_fill="pattern1")


def test_staged_path_between_processes(make_local: MakeLocal, spawn_peer: SpawnPeer) -> None:
    """The GPU code path (pinned staging, double-buffered) run on CPU tensors, odd sizes."""
    staged = {"force_staging": True, "staging_bytes": 1001}
    peer = spawn_peer("tcp", options=staged)
    check_read(make_local("tcp", **staged), peer)
    check_write(make_local("tcp", **staged), peer, peer_fill="pattern1")


def test_unreachable_peer_fails(make_local: MakeLocal) -> None:
    a, b, _, _ = _pair(make_local)
    b.close()  # nothing listens on b's port any more
    status, error = wait_done(a, a.post(TransferOp.READ, "b", [Segment(0, 0, 16)]), 10)
    assert status == "failed"
    assert error is not None and "ConnectionRefused" in error


def test_stalled_peer_times_out(make_local: MakeLocal, silent_server: socket.socket) -> None:
    a = make_local("tcp", io_timeout_s=0.5, connect_timeout_s=0.5)
    a.register_region(torch.zeros(4096, dtype=torch.uint8))
    a.add_peer("stalled", _stalled_descriptor(a, silent_server.getsockname()[1]))
    start = time.monotonic()
    status, error = wait_done(a, a.post(TransferOp.READ, "stalled", [Segment(0, 0, 16)]), 10)
    assert status == "failed"
    assert error is not None and "timed out" in error
    assert time.monotonic() - start < 3.0


def test_stopped_then_dead_peer_process_fail_in_bounded_time(make_local: MakeLocal,
                                                              spawn_peer: SpawnPeer) -> None:
    """SIGSTOP: the batch times out (io_timeout_s); SIGKILL: the next one fails at once."""
    peer = spawn_peer("tcp")
    stalled = make_local("tcp", io_timeout_s=0.5)
    stalled.register_region(torch.zeros(1 << 20, dtype=torch.uint8))
    stalled.add_peer("peer", peer.descriptor)
    segs = [Segment(0, 0, 1 << 20)]
    assert wait_done(stalled, stalled.post(TransferOp.READ, "peer", segs)) == ("done", None)
    peer.signal(signal.SIGSTOP)
    start = time.monotonic()
    status, error = wait_done(stalled, stalled.post(TransferOp.READ, "peer", segs), 10)
    assert status == "failed" and "timed out" in (error or "")
    assert time.monotonic() - start < 3.0
    peer.signal(signal.SIGCONT)
    error = check_dead_peer(make_local("tcp"), peer, bound_s=5.0)
    assert "peer 'peer'" in error


def test_remove_peer_fails_pending_at_once(make_local: MakeLocal,
                                           silent_server: socket.socket) -> None:
    a = make_local("tcp", io_timeout_s=30.0)
    a.register_region(torch.zeros(4096, dtype=torch.uint8))
    a.add_peer("stalled", _stalled_descriptor(a, silent_server.getsockname()[1]))
    handle = a.post(TransferOp.READ, "stalled", [Segment(0, 0, 16)])
    assert a.poll(handle) is TransferStatus.PENDING
    start = time.monotonic()
    a.remove_peer("stalled")
    assert a.poll(handle) is TransferStatus.FAILED
    assert "removed" in (a.error(handle) or "")
    assert time.monotonic() - start < 3.0  # its connection threads were unblocked


def test_release_pending_handle_forgets_it(make_local: MakeLocal,
                                           silent_server: socket.socket) -> None:
    a = make_local("tcp", io_timeout_s=30.0)
    a.register_region(torch.zeros(4096, dtype=torch.uint8))
    a.add_peer("stalled", _stalled_descriptor(a, silent_server.getsockname()[1]))
    handle = a.post(TransferOp.READ, "stalled", [Segment(0, 0, 16)])
    a.release(handle)
    with pytest.raises(KeyError):
        a.poll(handle)


def test_backstop_deadline_fails_a_stuck_batch(make_local: MakeLocal,
                                               silent_server: socket.socket) -> None:
    a = make_local("tcp", io_timeout_s=30.0, op_timeout_s=0.3)
    a.register_region(torch.zeros(4096, dtype=torch.uint8))
    a.add_peer("stalled", _stalled_descriptor(a, silent_server.getsockname()[1]))
    status, error = wait_done(a, a.post(TransferOp.READ, "stalled", [Segment(0, 0, 16)]), 5)
    assert status == "failed"
    assert error is not None and "op_timeout_s" in error


def _capture_requests(monkeypatch: pytest.MonkeyPatch) -> list[TcpRequest]:
    """Record every TcpRequest the client side sends."""
    sent: list[TcpRequest] = []
    original = tcp_peer.send_frame

    def spy(sock: socket.socket, header: Any, payload: Any = ()) -> None:
        if isinstance(header, TcpRequest):
            sent.append(header)
        original(sock, header, payload)

    monkeypatch.setattr(tcp_peer, "send_frame", spy)
    return sent


def test_contiguous_segments_go_as_one_range(make_local: MakeLocal,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sent = _capture_requests(monkeypatch)
    a, _, ra, rb = _pair(make_local)
    adjacent = [Segment(i * BLOCK_BYTES, i * BLOCK_BYTES, BLOCK_BYTES) for i in range(64)]
    assert wait_done(a, a.post(TransferOp.READ, "b", adjacent[::-1])) == ("done", None)
    strided = [Segment(i * BLOCK_BYTES, 2 * i * BLOCK_BYTES, BLOCK_BYTES) for i in range(64)]
    assert wait_done(a, a.post(TransferOp.WRITE, "b", strided)) == ("done", None)
    assert [(r.op, r.lengths) for r in sent] == [("read", [64 * BLOCK_BYTES]),
                                                  ("write", [BLOCK_BYTES] * 64)]
    assert torch.equal(ra[:64 * BLOCK_BYTES], pattern(1 << 20, seed=1)[:64 * BLOCK_BYTES])
    assert torch.equal(rb[: 128 * BLOCK_BYTES].view(64, 2, BLOCK_BYTES)[:, 0].reshape(-1),
                       ra[:64 * BLOCK_BYTES])


def test_large_batch_is_split_over_connections(make_local: MakeLocal,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    sent = _capture_requests(monkeypatch)
    a, _, ra, rb = _pair(make_local, split_min_bytes=64 * 1024)
    assert wait_done(a, a.post(TransferOp.READ, "b", [Segment(0, 0, 1 << 20)])) == ("done", None)
    assert sorted(r.remote_offsets[0] for r in sent) == [0, 1 << 19]
    assert [sum(r.lengths) for r in sent] == [1 << 19, 1 << 19]
    assert torch.equal(ra, rb)


def test_split_segments_keeps_every_byte() -> None:
    segs = [Segment(0, 100, 10), Segment(50, 0, 7), Segment(70, 300, 13)]
    parts = split_segments(segs, 3)
    assert len(parts) == 3
    flat = [s for part in parts for s in part]
    assert sum(s.length for s in flat) == 30
    covered = {(s.local_offset + k, s.remote_offset + k) for s in flat for k in range(s.length)}
    expected = {(s.local_offset + k, s.remote_offset + k) for s in segs for k in range(s.length)}
    assert covered == expected
    assert split_segments(segs, 1) == [segs]


def test_many_concurrent_transfers_use_bounded_threads(make_local: MakeLocal) -> None:
    num_transfers = 512
    before = threading.active_count()
    a, _, ra, rb = _pair(make_local, nbytes=num_transfers * 1024, max_connections_per_peer=4)
    handles = [a.post(TransferOp.READ, "b", [Segment(i * 1024, i * 1024, 1024)])
               for i in range(num_transfers)]
    peak = threading.active_count()
    results = [wait_done(a, h) for h in handles]
    peak = max(peak, threading.active_count())
    assert results == [("done", None)] * num_transfers
    assert torch.equal(ra, rb)
    # 4 client connection threads + 4 server connection threads + 2 accept threads.
    assert peak - before <= 10


def test_wrong_token_is_refused(make_local: MakeLocal) -> None:
    a, b, _, _ = _pair(make_local)
    forged = msgspec.structs.replace(decode_descriptor(b.descriptor()), token=b"x" * 16)
    a.add_peer("forged", encode_descriptor(forged))
    status, error = wait_done(a, a.post(TransferOp.READ, "forged", [Segment(0, 0, 16)]))
    assert status == "failed"
    assert error is not None and "wrong token" in error


def test_bad_arguments_are_clear_errors(make_local: MakeLocal) -> None:
    a, _, _, _ = _pair(make_local)
    with pytest.raises(ValueError, match="past the peer's region"):
        a.post(TransferOp.READ, "b", [Segment(0, (1 << 20) - 1, 2)])
    status, error = wait_done(a, a.post(TransferOp.READ, "nobody", [Segment(0, 0, 1)]))
    assert status == "failed" and "unknown peer" in (error or "")
    with pytest.raises(TransportError, match="not a tcp transport descriptor"):
        a.add_peer("junk", b"\x00junk")
    with pytest.raises(TransportError, match="unknown tcp transport option"):
        make_local("tcp", no_such_option=1)
    assert wait_done(a, a.post(TransferOp.READ, "b", [])) == ("done", None)


def test_close_fails_pending_and_is_idempotent(make_local: MakeLocal,
                                               silent_server: socket.socket) -> None:
    a = make_local("tcp", io_timeout_s=30.0)
    a.register_region(torch.zeros(4096, dtype=torch.uint8))
    a.add_peer("stalled", _stalled_descriptor(a, silent_server.getsockname()[1]))
    handle = a.post(TransferOp.WRITE, "stalled", [Segment(0, 0, 16)])
    start = time.monotonic()
    a.close()
    a.close()
    assert a.poll(handle) is TransferStatus.FAILED
    assert time.monotonic() - start < 5.0


@pytest.mark.gpu
def test_gpu_regions_between_processes(make_local: MakeLocal, spawn_peer: SpawnPeer) -> None:
    """Real pinned staging + CUDA streams: GPU region <-> GPU region in another process."""
    check_read(make_local("tcp"), spawn_peer("tcp", device="cuda:0"), device="cuda")
    check_write(make_local("tcp"), spawn_peer("tcp", fill="zeros", device="cuda:0"),
                device="cuda")


def test_connections_that_never_authenticate_hold_nothing_for_long(
        make_local: MakeLocal, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before its hello a connection is anyone's: a hello announced at 64 MiB is refused
    before anything is allocated, one dripped a byte at a time is cut at HELLO_TIMEOUT_S,
    connections past MAX_PENDING_HELLOS are closed at accept, and real peers still get
    through once the strangers are gone."""
    from connectors.transports import tcp_server

    monkeypatch.setattr(tcp_server, "HELLO_TIMEOUT_S", 0.5)
    monkeypatch.setattr(tcp_server, "MAX_PENDING_HELLOS", 4)
    a, b, ra, rb = _pair(make_local)
    port = decode_descriptor(b.descriptor()).port

    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.settimeout(5)
        return sock

    huge = connect()
    huge.sendall((64 << 20).to_bytes(4, "little"))
    assert huge.recv(1) == b""  # closed: over MAX_HELLO_BYTES
    drippers = [connect() for _ in range(4)]
    started = time.monotonic()
    for sock in drippers:
        sock.sendall(b"\x10")  # the first byte of a length prefix, then nothing
    extra = connect()
    assert extra.recv(1) == b""  # a fifth stranger: closed at once
    for sock in drippers:
        assert sock.recv(1) == b""  # cut at the hello deadline
    assert time.monotonic() - started < 3.0
    deadline = time.monotonic() + 10  # the cut connections' threads free their slots at once
    while (result := wait_done(a, a.post(TransferOp.READ, "b", [Segment(0, 0, 4096)]))
           )[0] != "done":
        assert time.monotonic() < deadline, result
        time.sleep(0.1)
    assert torch.equal(ra[:4096], rb[:4096])
    for sock in (huge, extra, *drippers):
        sock.close()


@pytest.mark.parametrize(("options", "says"), [
    ({"bogus": 1}, "unknown tcp transport option"),
    ({"port": "abc"}, "port must be int"),
    ({"port": 70000}, "0 to 65535"),
    ({"io_timeout_s": -1}, "positive"),
    ({"op_timeout_s": "never"}, "op_timeout_s must be float or None"),
    ({"max_connections_per_peer": 0}, ">= 1"),
    ({"force_staging": 1}, "force_staging must be bool"),
    ({"staging_bytes": -1}, "positive"),
])
def test_unusable_options_are_a_configuration_error_naming_them(options: dict[str, Any],
                                                                says: str) -> None:
    """A ConfigError: the instance refuses to start with one line, no traceback (they were
    accepted, or failed later as a TypeError deep in start-up)."""
    from connectors.transports.tcp import TcpOptions
    from connectors.transports.validation import build_options
    from disagg.common.config import ConfigError

    with pytest.raises(ConfigError, match=says):
        build_options(TcpOptions, "tcp", options)
    assert build_options(TcpOptions, "tcp", {"op_timeout_s": None, "io_timeout_s": 2}).port == 0
