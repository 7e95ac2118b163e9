"""PDWorkerSide over several TP ranks (fake ranks): a transfer is one op whose parts all have
to land; one failed part fails it at once, yet its blocks stay parked (PENDING) while another
part may still write them; releasing or dropping it cancels every part on every rank."""

from __future__ import annotations

import torch

from connectors.pd_heads import RankGeometry
from connectors.pd_worker import PDWorkerSide
from connectors.protocol import EngineMetadata
from connectors.transports.base import TransferOp, TransferStatus


class FakeRank:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.kv_cache = torch.zeros(8, 2, 2, 4, 1, 2)
        self.block_bytes = self.kv_cache[0].numel() * 4
        self.layer_bytes = self.block_bytes // 2
        self.transport = type("T", (), {"name": "fake"})()
        self.state: dict[int, TransferStatus] = {}
        self.posted: list[tuple[str, int]] = []
        self.released: list[int] = []
        self.unposted: set[int] = set()
        self.peers: dict[str, bytes] = {}

    def descriptor(self) -> bytes:
        return f"r{self.rank}".encode()

    def add_peer(self, name: str, descriptor: bytes) -> None:
        self.peers[name] = descriptor

    def post_rows(self, op: TransferOp, peer: str, rows: object, label: str) -> int:
        op_id = len(self.posted) + 1
        self.posted.append((peer, op_id))
        self.state[op_id] = TransferStatus.PENDING
        return op_id

    def poll(self, op_id: int) -> TransferStatus:
        return self.state[op_id]

    def error(self, op_id: int) -> str:
        return f"rank {self.rank} op {op_id} broke"

    def release(self, op_id: int) -> None:
        self.released.append(op_id)

    def drop_unposted(self, op_ids: list[int]) -> list[int]:
        return [i for i in op_ids if i not in self.unposted]


def _side() -> tuple[PDWorkerSide, list[FakeRank]]:
    ranks = [FakeRank(0), FakeRank(1)]
    side = PDWorkerSide(ranks, num_kv_heads=2, geometry=RankGeometry(2, 4, 1, 8))
    meta = EngineMetadata(engine_id="peer", epoch=1, host="127.0.0.1", handshake_port=1,
                          notify_port=2, transport="fake", transport_descriptor=b"p0",
                          block_size=4, block_bytes=2 * 2 * 4 * 1 * 8, num_blocks=8,
                          dtype="float32", compat_hash="x", layout="l", tp_size=2,
                          rank_descriptors=[b"p0", b"p1"])
    side.add_peer(meta)
    return side, ranks


def test_each_rank_posts_to_its_peer_rank_and_done_needs_every_part() -> None:
    side, ranks = _side()
    op, nbytes = side.post(TransferOp.READ, "peer", [1, 2], [3, 4])
    assert nbytes == 2 * 2 * (2 * 2 * 4 * 8)  # 2 ranks x 2 blocks of each rank's bytes
    assert ranks[0].posted == [("peer", 1)] and ranks[1].posted == [("peer#r1", 1)]
    assert ranks[1].peers == {"peer#r1": b"p1"}
    ranks[0].state[1] = TransferStatus.DONE
    assert side.poll(op) is TransferStatus.PENDING
    ranks[1].state[1] = TransferStatus.DONE
    assert side.poll(op) is TransferStatus.DONE
    side.release(op)
    assert ranks[0].released == [1] and ranks[1].released == [1]


def test_one_failed_part_fails_once_then_stays_pending_while_another_runs() -> None:
    side, ranks = _side()
    op, _ = side.post(TransferOp.WRITE, "peer", [1], [2])
    ranks[1].state[1] = TransferStatus.FAILED
    assert side.poll(op) is TransferStatus.FAILED
    assert "tp rank 1" in (side.error(op) or "")
    assert side.poll(op) is TransferStatus.PENDING  # rank 0's write may still land
    assert side.drop_unposted([op]) == [op]  # posted: it may still write, keep it parked
    ranks[0].state[1] = TransferStatus.DONE
    assert side.poll(op) is TransferStatus.FAILED
    side.release(op)
    assert ranks[0].released == [1] and ranks[1].released == [1]


def test_dropping_an_op_whose_parts_never_posted_forgets_it() -> None:
    side, ranks = _side()
    op, _ = side.post(TransferOp.WRITE, "peer", [1], [2])
    ranks[0].unposted.add(1)
    ranks[1].unposted.add(1)
    assert side.drop_unposted([op]) == []  # each rank dropped (forgot) its own part
    assert side.error(op) is None and op not in side._ops
    op2, _ = side.post(TransferOp.WRITE, "peer", [1], [2])
    ranks[0].state[2] = TransferStatus.DONE  # one part ended, the other never posted
    ranks[1].unposted.add(2)
    assert side.poll(op2) is TransferStatus.PENDING
    assert side.drop_unposted([op2]) == []
    assert ranks[0].released == [2]  # the ended part is released with the op


def test_a_restarted_peer_is_connected_again() -> None:
    side, ranks = _side()
    meta = EngineMetadata(engine_id="peer", epoch=2, host="127.0.0.1", handshake_port=1,
                          notify_port=2, transport="fake", transport_descriptor=b"n0",
                          block_size=4, block_bytes=2 * 2 * 4 * 2 * 8, num_blocks=8,
                          dtype="float32", compat_hash="x", layout="l", tp_size=1,
                          rank_descriptors=[b"n0"])
    side.add_peer(meta)
    assert ranks[0].peers["peer"] == b"n0" and side.peers["peer"].tp_size == 1
    assert not side.streams_layers_to("peer")  # this side has two ranks
