"""The connector's peer links, transfers from kv_transfer_params, and option parsing, in
isolation (the end-to-end behaviour is in test_pd_connector.py)."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest

from connectors.pd_metadata import parse_mode_policy
from connectors.pd_peers import PeerLinks
from connectors.protocol import EngineMetadata, Release, RemoteBlocks
from connectors.transfer import Timeouts, Transfer, TransferRole, transfer_from_params
from disagg.config import ConfigError


def _meta(engine_id: str) -> EngineMetadata:
    return EngineMetadata(engine_id=engine_id, host="127.0.0.1", handshake_port=7000,
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

    def set_leases(self, by_peer: dict[tuple[str, int], list[str]]) -> None:
        self.leases = by_peer


class _Worker:
    def __init__(self) -> None:
        self.peers: list[tuple[str, bytes]] = []

    def add_peer(self, engine_id: str, descriptor: bytes) -> None:
        self.peers.append((engine_id, descriptor))


def _links() -> tuple[PeerLinks, _Control, _Worker, dict[str, float]]:
    control, worker = _Control(), _Worker()
    counters = {"notifications_unknown_total": 0.0}
    timeouts = Timeouts(transfer_timeout_s=30.0, defer_timeout_s=60.0, lease_timeout_s=5.0,
                        heartbeat_interval_s=1.0)
    return PeerLinks(control, worker, timeouts, counters), control, worker, counters  # type: ignore[arg-type]


def _transfer(tid: str = "t1", peer: str | None = "P") -> Transfer:
    return Transfer(tid, TransferRole.CONSUMER_READ, "r-" + tid, 0.0, peer_engine_id=peer,
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


def test_a_restarted_peer_is_handshaken_afresh() -> None:
    links, control, worker, _ = _links()
    t = _transfer(peer="P-new")  # the proxy already knows the new engine id
    links.start_hello(t)
    control.futures[0].set_result(_meta("P-old"))  # cached answer of the old process
    assert links.resolve(t) == (None, None)
    assert len(control.hellos) == 2 and not worker.peers
    control.futures[1].set_result(_meta("P-new"))
    assert links.resolve(t) == ("P-new", None)
    links.forget_hello(t)  # after a failed op: next transfer handshakes again
    links.start_hello(t)
    assert len(control.hellos) == 3


def test_sends_and_leases_go_to_the_peers_notify_address() -> None:
    links, control, _, _ = _links()
    t, unknown = _transfer(), Transfer("u", TransferRole.PRODUCER_READ, "r-u", 0.0)
    links.send(t, Release(transfer_id="t1", engine_id="D"))
    links.send(unknown, Release(transfer_id="u", engine_id="D"))  # no address: dropped
    assert [addr for addr, _ in control.sent] == [("127.0.0.1", 7001)]
    links.refresh_leases([t, unknown, _transfer("t3")])
    assert control.leases == {("127.0.0.1", 7001): ["t1", "t3"]}


def test_expire_drops_old_early_notifications_and_tombstones() -> None:
    links, _, _, counters = _links()
    early = RemoteBlocks(transfer_id="e", engine_id="D", block_ids=[1], num_tokens=3,
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
    t = transfer_from_params(params, "r", "read", 1.0, layerwise=True)
    assert t is not None and t.role is role and t.layerwise is layerwise
    assert t.transfer_id == "a" and t.request_id == "r" and t.created_s == 1.0


def test_transfer_from_params_without_a_transfer_is_none() -> None:
    assert transfer_from_params({}, "r", "read", 0.0, layerwise=False) is None
    assert transfer_from_params({"transfer_id": "a"}, "r", "read", 0.0, layerwise=False) is None
    assert transfer_from_params({"do_remote_decode": True}, "r", "read", 0.0,
                                layerwise=False) is None


def test_mode_and_policy_are_validated() -> None:
    assert parse_mode_policy({}, "kv_both", 1) == ("read", "fail")
    assert parse_mode_policy({"mode": "write", "kv_load_failure_policy": "recompute"},
                             "kv_consumer", 4) == ("write", "recompute")
    with pytest.raises(ConfigError, match="mode must be read or write, got 'push'"):
        parse_mode_policy({"mode": "push"}, "kv_both", 1)
    with pytest.raises(ConfigError, match="kv_load_failure_policy must be fail or recompute"):
        parse_mode_policy({"kv_load_failure_policy": "retry"}, "kv_both", 1)
    with pytest.raises(ConfigError, match="WRITE mode with a data-parallel prefill"):
        parse_mode_policy({"mode": "write"}, "kv_producer", 2)
