"""The connector's peer links (identity, handshakes, sends, leases) and transfers from
kv_transfer_params, in isolation (the end-to-end behaviour is in test_pd_connector.py)."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest

from connectors import pd_peers
from connectors.pd_peers import PeerLinks
from connectors.protocol import EngineMetadata, Release, RemoteBlocks
from connectors.transfer import (
    Timeouts,
    Transfer,
    TransferRole,
    TransferState,
    transfer_from_params,
)
from disagg.common.kv_transfer_params import KVParamsError, TransferMode, parse_kv_params


def _meta(engine_id: str, epoch: int = 1) -> EngineMetadata:
    return EngineMetadata(engine_id=engine_id, epoch=epoch, host="127.0.0.1", handshake_port=7000,
                          notify_port=7001, transport="tcp",
                          transport_descriptor=engine_id.encode(), block_size=16,
                          block_bytes=4096, num_blocks=8, dtype="float32", compat_hash="h",
                          layout="l")


class _Control:
    """The ControlPlane calls PeerLinks makes, with futures the test completes."""

    def __init__(self) -> None:
        self.hellos: list[tuple[str, int, float]] = []
        self.futures: list[concurrent.futures.Future[EngineMetadata]] = []
        self.sent: list[tuple[tuple[str, int], Any]] = []
        self.leases: dict[tuple[str, int], list[str]] = {}

    def handshake(self, host: str, port: int,
                  timeout_s: float) -> concurrent.futures.Future[EngineMetadata]:
        self.hellos.append((host, port, timeout_s))
        self.futures.append(concurrent.futures.Future())
        return self.futures[-1]

    def send(self, addr: tuple[str, int], msg: Any) -> None:
        self.sent.append((addr, msg))

    def set_leases(self, by_peer: dict[tuple[str, int], list[str]],
                   received: dict[tuple[str, int], list[str]] | None = None) -> None:
        self.leases = by_peer
        self.received = received or {}


class _Worker:
    def __init__(self) -> None:
        self.peers: list[tuple[str, bytes]] = []

    def add_peer(self, meta: EngineMetadata) -> None:
        self.peers.append((meta.engine_id, meta.transport_descriptor))


def _links() -> tuple[PeerLinks, _Control, _Worker, dict[str, float]]:
    control, worker = _Control(), _Worker()
    counters = {"notifications_unknown_total": 0.0}
    timeouts = Timeouts(transfer_timeout_s=30.0, defer_timeout_s=60.0, lease_timeout_s=5.0,
                        heartbeat_interval_s=1.0)
    return PeerLinks(control, worker, timeouts, counters), control, worker, counters  # type: ignore[arg-type]


def _transfer(tid: str = "t1", peer: str | None = "P", created_s: float = 0.0) -> Transfer:
    return Transfer(tid, TransferRole.CONSUMER_READ, "r-" + tid, created_s, peer_engine_id=peer,
                    peer_host="127.0.0.1", peer_handshake_port=7000, peer_notify_port=7001)


def test_one_handshake_per_peer_address_and_its_result_connects_the_transport() -> None:
    links, control, worker, _ = _links()
    a, b = _transfer("a"), _transfer("b")
    links.start_hello(a)
    links.start_hello(b)
    assert [h[:2] for h in control.hellos] == [("127.0.0.1", 7000)]
    assert control.hellos[0][2] == 10.0  # capped below transfer_timeout
    assert links.resolve(a) == (None, None)  # pending
    control.futures[0].set_result(_meta("P"))
    assert links.resolve(a) == ("P", None) and links.resolve(b) == ("P", None)
    assert worker.peers[0] == ("P", b"P")


def test_refused_handshake_is_reported_and_retried_by_the_next_transfer() -> None:
    links, control, _, _ = _links()
    t = _transfer()
    links.start_hello(t)
    control.futures[0].set_exception(ConnectionRefusedError("peer has block_size 32, not 16"))
    assert links.resolve(t) == (None, "peer has block_size 32, not 16")
    links.start_hello(_transfer("t2"))
    assert len(control.hellos) == 2


def test_a_cached_answer_older_than_the_transfer_is_handshaken_afresh_once() -> None:
    links, control, worker, _ = _links()
    old = _transfer("old", peer="P-old")
    links.start_hello(old)
    control.futures[0].set_result(_meta("P-old"))  # cached answer of the old process
    assert links.resolve(old) == ("P-old", None)
    t = _transfer(peer="P-new", created_s=time.monotonic() + 1)  # the proxy knows the new id
    assert links.resolve(t) == (None, None)
    assert len(control.hellos) == 2 and len(worker.peers) == 1
    control.futures[1].set_result(_meta("P-new"))
    assert links.resolve(t) == ("P-new", None)
    assert t.peer_epoch == 1 and t.peer_num_blocks == 8
    links.forget_hello(t)  # after a failed op: next transfer handshakes again
    links.start_hello(t)
    assert len(control.hellos) == 3


@pytest.mark.parametrize(("answer", "expected_epoch"), [(_meta("P-new"), None),
                                                          (_meta("P", epoch=2), 1)])
def test_a_fresh_answer_from_another_engine_fails_the_transfer(answer: EngineMetadata,
                                                               expected_epoch: int | None
                                                               ) -> None:
    """The address now answers as another engine (or the same id, another epoch): the KV the
    transfer expected is gone, so it fails instead of handshaking forever."""
    links, control, worker, _ = _links()
    t = _transfer(peer="P")
    t.peer_epoch = expected_epoch
    links.start_hello(t)
    control.futures[0].set_result(answer)
    peer, error = links.resolve(t)
    assert peer is None and error is not None and "restarted" in error
    assert len(control.hellos) == 1 and not worker.peers


def test_identity_is_engine_id_and_epoch_and_the_table_is_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    links, _, _, _ = _links()
    links.learn(_meta("P", epoch=5))
    assert links.identify("P", 5) is not None
    assert links.identify("P", 6) is None and links.identify("Q", 5) is None
    monkeypatch.setattr(pd_peers, "MAX_KNOWN_PEERS", 3)
    for i in range(5):
        links.learn(_meta(f"E{i}"))
    assert list(links.known) == ["E2", "E3", "E4"]


def test_a_flood_of_strangers_never_unseats_a_peer_a_live_transfer_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone can handshake: thousands of new engine ids, or new epochs claiming a known
    engine's id, push only other strangers out of the bounded table while a transfer names
    the peer (it used to be forgotten, and its every message dropped as unidentified)."""
    monkeypatch.setattr(pd_peers, "MAX_KNOWN_PEERS", 3)
    monkeypatch.setattr(pd_peers, "MAX_EPOCHS_PER_ENGINE", 2)
    transfers: dict[str, Transfer] = {}
    timeouts = Timeouts(30.0, 60.0, 5.0, 1.0)
    links = PeerLinks(_Control(), _Worker(), timeouts, {}, transfers)  # type: ignore[arg-type]
    links.learn(_meta("D", epoch=1))
    t = _transfer(peer="D")
    t.peer_epoch = 1
    transfers[t.transfer_id] = t
    for i in range(20):
        links.learn(_meta(f"stranger{i}"))
        links.learn(_meta("D", epoch=100 + i))  # claiming D's id
    assert links.identify("D", 1) is not None
    assert len(links.known) == 3 and len(links.known["D"]) == 2
    del transfers[t.transfer_id]  # no transfer names it: D is a table entry like any other
    for i in range(3):
        links.learn(_meta(f"later{i}"))
    assert links.identify("D", 1) is None


def test_early_remote_blocks_are_bounded_in_count_and_in_block_ids(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Their senders are not identified yet: a flood of large ones is dropped, not kept in
    memory until defer_timeout (eight 1M-id frames held ~330 MB)."""
    monkeypatch.setattr(pd_peers, "MAX_EARLY", 3)
    monkeypatch.setattr(pd_peers, "MAX_EARLY_BLOCK_IDS", 10)
    links, _, _, _ = _links()

    def blocks(tid: str, n: int) -> RemoteBlocks:
        return RemoteBlocks(transfer_id=tid, engine_id="D", epoch=1, generation=2,
                            block_ids=list(range(n)), num_tokens=16 * n, host="h",
                            handshake_port=1, notify_port=2)

    assert links.stash_early(blocks("a", 6), 0.0)
    assert not links.stash_early(blocks("big", 5), 0.0)  # 11 ids > 10
    assert links.stash_early(blocks("b", 4), 0.0)
    assert links.stash_early(blocks("a", 1), 0.0)  # a resend replaces: 5 ids now
    assert links.stash_early(blocks("c", 1), 0.0)
    assert not links.stash_early(blocks("d", 1), 0.0)  # 3 entries
    taken = links.take_early("b")
    assert taken is not None and len(taken.block_ids) == 4
    assert links.stash_early(blocks("big", 5), 0.0)  # room again: 2 + 5 ids
    assert links.take_early("b") is None


def test_sends_and_leases_go_to_the_peers_notify_address() -> None:
    links, control, _, _ = _links()
    t, unknown = _transfer(), Transfer("u", TransferRole.PRODUCER_READ, "r-u", 0.0)
    links.send(t, Release(transfer_id="t1", engine_id="D", epoch=1, generation=2))
    links.send(unknown, Release(transfer_id="u", engine_id="D", epoch=1, generation=2))
    assert [addr for addr, _ in control.sent] == [("127.0.0.1", 7001)]
    links.refresh_leases([t, unknown, _transfer("t3")])
    assert control.leases == {("127.0.0.1", 7001): ["t1", "t3"]}


def test_draining_writes_are_leased_and_early_blocks_of_known_decodes_acknowledged() -> None:
    """A failed WRITE whose writes still drain is leased (the decode waits for its quiesced);
    decode blocks held for no transfer yet are acknowledged as ``received`` (alive, no lease)
    to the address the decode handshook from, never to the one its unidentified message
    names, and not at all while the decode is unknown."""
    links, control, _, _ = _links()
    draining = Transfer("w", TransferRole.PRODUCER_WRITE, "r-w", 0.0, peer_host="127.0.0.1",
                        peer_notify_port=7001, state=TransferState.FAILED, handles=[3])

    def blocks(tid: str, engine: str) -> RemoteBlocks:
        return RemoteBlocks(transfer_id=tid, engine_id=engine, epoch=1, generation=2,
                            block_ids=[1], num_tokens=16, host="10.9.9.9", handshake_port=1,
                            notify_port=2)

    assert links.stash_early(blocks("e1", "D"), 0.0)
    assert links.stash_early(blocks("e2", "stranger"), 0.0)
    links.refresh_leases([], [draining])
    assert control.leases == {("127.0.0.1", 7001): ["w"]} and not control.received
    links.learn(_meta("D"))
    links.refresh_leases([], [draining])
    assert control.received == {("127.0.0.1", 7001): ["e1"]}


def test_a_peer_is_heard_when_it_speaks_or_answers_and_forgotten_with_it() -> None:
    links, control, _, _ = _links()
    assert links.identify("P", 1) is None and links.last_heard("P", None) is None  # a stranger
    t = _transfer()
    before = time.monotonic()
    links.start_hello(t)
    control.futures[0].set_result(_meta("P"))
    assert links.resolve(t) == ("P", None)
    heard = links.last_heard("P", 1)
    assert heard is not None and heard >= before  # answered after we asked
    links.heard_s[("P", 1)] = 0.0
    assert links.identify("P", 1) is not None and links.heard_s[("P", 1)] >= before
    links.hello_from(_meta("P", epoch=2))  # another process claiming P's id
    assert links.heard_s[("P", 1)] >= before and links.last_heard("P", 2) is not None
    links.heard_s[("P", 1)] = 0.0
    assert links.last_heard("P", 1) == 0.0  # P itself still silent
    assert links.last_heard("P", None) == links.heard_s[("P", 2)]  # unbound: any epoch
    links.hello_from(_meta("D"))
    assert (links.last_heard("D", 1) or 0.0) >= before
    for i in range(pd_peers.MAX_KNOWN_PEERS + 1):
        links.learn(_meta(f"other{i}"))
    assert "D" not in links.known and links.last_heard("D", None) is None


def test_expire_drops_old_early_notifications_and_tombstones() -> None:
    links, _, _, counters = _links()
    early = RemoteBlocks(transfer_id="e", engine_id="D", epoch=1, generation=2, block_ids=[1],
                         num_tokens=3,
                         host="h", handshake_port=1, notify_port=2)
    links.early["e"], links.early["fresh"] = (early, 0.0), (early, 50.0)
    links.tombstones["x"] = ("gave up", 0.0)
    links.expire(61.0)
    assert list(links.early) == ["fresh"] and not links.tombstones
    assert counters["notifications_unknown_total"] == 1


@pytest.mark.parametrize(("params", "role", "layerwise"), [
    ({"transfer_id": "a", "do_remote_prefill": True}, TransferRole.CONSUMER_READ, False),
    ({"transfer_id": "a", "do_remote_prefill": True, "mode": "write"},
     TransferRole.CONSUMER_WRITE, False),
    ({"transfer_id": "a", "do_remote_decode": True}, TransferRole.PRODUCER_READ, False),
    ({"transfer_id": "a", "do_remote_decode": True, "mode": "write"},
     TransferRole.PRODUCER_WRITE, True),
])
def test_transfer_from_params_roles(params: dict[str, Any], role: TransferRole,
                                    layerwise: bool) -> None:
    t = transfer_from_params(parse_kv_params(params), "r", TransferMode.READ, 1.0,
                             layerwise=True)
    assert t.role is role and t.layerwise is layerwise
    assert t.transfer_id == "a" and t.request_id == "r" and t.created_s == 1.0


@pytest.mark.parametrize("params", [
    {}, {"transfer_id": "a"}, {"do_remote_decode": True},
    {"transfer_id": "a", "do_remote_decode": True, "do_remote_prefill": True},
    {"transfer_id": "a b", "do_remote_decode": True},
    {"transfer_id": "a", "do_remote_prefill": True, "remote_block_ids": [2**64 - 1]},
    {"transfer_id": "a", "do_remote_prefill": True, "remote_block_ids": [2**49 + 3]},
    {"transfer_id": "a", "do_remote_prefill": True, "remote_num_tokens": "abc"},
    {"transfer_id": "a", "do_remote_prefill": True, "remote_handshake_port": 0},
    {"transfer_id": "a", "do_remote_prefill": True, "mode": "push"},
    {"transfer_id": "a", "do_remote_prefill": True, "surprise": 1},
    [], "x", None,
])
def test_params_that_cannot_describe_a_transfer_are_refused_at_the_edge(params: Any) -> None:
    with pytest.raises(KVParamsError):
        parse_kv_params(params)


def test_bury_drops_the_transfers_remote_blocks_and_keeps_the_newest_tombstones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pd_peers, "MAX_TOMBSTONES", 3)
    links, _, _, _ = _links()
    early = RemoteBlocks(transfer_id="a", engine_id="D", epoch=1, generation=2, block_ids=[1],
                         num_tokens=3, host="h", handshake_port=1, notify_port=2)
    links.early["a"], links.early["keep"] = (early, 0.0), (early, 0.0)
    for i, tid in enumerate(["a", "b", "c", "a", "d"]):
        links.bury(tid, f"gave up {i}", float(i))
    assert list(links.early) == ["keep"]
    assert list(links.tombstones) == ["c", "a", "d"]  # "b" was the oldest; "a" was buried again
    assert links.tombstones["a"] == ("gave up 3", 3.0)
