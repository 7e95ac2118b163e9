"""The worker's op ids and the poster thread: a deferred WRITE is posted only after its event,
never after its release, and fails by deadline instead of waiting forever."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from fake_transport import FakeTransport

from connectors.pd_poster import Posts
from connectors.transports.base import Segment, TransferOp, TransferStatus

SEGS = [Segment(0, 64, 32)]


class FakeEvent:
    """A CUDA event stand-in: ``query()`` is False until ``set()``."""

    def __init__(self) -> None:
        self._done = threading.Event()

    def set(self) -> None:
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()


class RefusingTransport(FakeTransport):
    """Refuses every batch, as a transport does for out-of-range segments."""

    def post(self, op: TransferOp, peer_name: str, segments: Sequence[Segment]) -> int:
        raise ValueError("segment out of range")


@pytest.fixture
def transport() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
def posts(transport: FakeTransport) -> Iterator[Posts]:
    p = Posts(transport, ready_timeout_s=5.0)
    yield p
    p.close()


def _wait(cond: Callable[[], object], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_posts_only_after_the_event(posts: Posts, transport: FakeTransport) -> None:
    event = FakeEvent()
    op = posts.post_after(event, "peer", SEGS, "layer 0 write to peer")
    time.sleep(0.05)
    assert posts.poll(op) is TransferStatus.PENDING and not transport.posts
    event.set()
    _wait(lambda: transport.posts)
    assert transport.posts == [(TransferOp.WRITE, "peer", SEGS)]
    transport.settle_all(TransferStatus.DONE)
    assert posts.poll(op) is TransferStatus.DONE
    posts.release(op)
    assert transport.released == [1]


def test_released_before_its_event_is_never_posted(posts: Posts,
                                                    transport: FakeTransport) -> None:
    first, second = FakeEvent(), FakeEvent()
    cancelled = posts.post_after(first, "peer", SEGS, "layer 0 write to peer")
    kept = posts.post_after(second, "peer", SEGS, "layer 1 write to peer")
    posts.release(cancelled)
    first.set()
    second.set()
    _wait(lambda: posts.poll(kept) is TransferStatus.PENDING and transport.posts)
    assert len(transport.posts) == 1  # only the op still alive


def test_drop_unposted_keeps_only_posted_ops(posts: Posts, transport: FakeTransport) -> None:
    posted = posts.post(TransferOp.WRITE, "peer", SEGS, "write of 1 runs to peer")
    event = FakeEvent()
    queued = posts.post_after(event, "peer", SEGS, "layer 0 write to peer")
    assert posts.drop_unposted([posted, queued]) == [posted]
    event.set()
    time.sleep(0.05)
    assert len(transport.posts) == 1  # the queued write was never started


def test_event_never_completing_fails_by_deadline(transport: FakeTransport) -> None:
    posts = Posts(transport, ready_timeout_s=0.05)
    try:
        op = posts.post_after(FakeEvent(), "peer", SEGS, "layer 2 write to peer")
        _wait(lambda: posts.poll(op) is TransferStatus.FAILED)
        assert "layer 2 write to peer: its KV was not computed within" in (posts.error(op) or "")
        assert not transport.posts
    finally:
        posts.close()


def test_refused_batch_is_a_failed_op() -> None:
    posts = Posts(RefusingTransport(), ready_timeout_s=1.0)
    op = posts.post(TransferOp.WRITE, "peer", SEGS, "write of 1 runs to peer")
    assert posts.poll(op) is TransferStatus.FAILED
    assert posts.error(op) == ("write of 1 runs to peer: could not post KV write: "
                               "segment out of range")
    posts.close()


def test_transport_errors_carry_the_op_label(posts: Posts, transport: FakeTransport) -> None:
    op = posts.post(TransferOp.READ, "peer", SEGS, "read of 1 runs to peer")
    transport.settle_all(TransferStatus.FAILED)
    assert posts.poll(op) is TransferStatus.FAILED
    assert posts.error(op) == "read of 1 runs to peer: link down"
