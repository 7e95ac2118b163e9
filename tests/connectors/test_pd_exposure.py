"""A WRITE decode's exposure to each prefill (connectors/pd_exposure.py), in isolation; the
end-to-end behaviour with a frozen or late prefill is in test_pd_consumer_end.py."""

from __future__ import annotations

from typing import cast

from connectors.pd_exposure import Exposure
from connectors.pd_outcome import Parked
from connectors.pd_peers import PeerLinks
from connectors.transfer import Timeouts, Transfer, TransferRole, TransferState

TIMEOUTS = Timeouts(lease_timeout_s=5.0)


class _Peers:
    """PeerLinks.last_heard over a table keyed by engine id (every test peer has epoch 1 or
    is not bound to one yet)."""

    def __init__(self) -> None:
        self.heard_s: dict[str, float] = {}

    def last_heard(self, engine_id: str, epoch: int | None) -> float | None:
        return self.heard_s.get(engine_id)


def _announced(tid: str, peer: str, blocks: int, at: float, *, skip: int = 0,
               acknowledged: bool = False) -> Transfer:
    return Transfer(tid, TransferRole.CONSUMER_WRITE, "r-" + tid, 0.0, peer_engine_id=peer,
                    local_block_ids=list(range(blocks)), skip_blocks=skip, announced=True,
                    announced_s=at, acknowledged=acknowledged)


def _exposure(transfers: list[Transfer], parked: list[Parked] | None = None,
              num_blocks: int = 40) -> tuple[Exposure, _Peers]:
    peers = _Peers()
    live = {t.transfer_id: t for t in transfers}
    held = {p.transfer.transfer_id: p for p in parked or []}
    return Exposure(live, held, cast(PeerLinks, peers), TIMEOUTS, num_blocks), peers


def test_blocks_at_risk_are_the_unacknowledged_and_the_unquiesced_ones_per_producer() -> None:
    failed = _announced("f", "P", 6, 0.0)
    failed.state = TransferState.FAILED
    transfers = [_announced("a", "P", 4, 0.0), _announced("b", "P", 5, 0.0, skip=2),
                 _announced("acked", "P", 7, 0.0, acknowledged=True),
                 _announced("q", "Q", 3, 0.0), failed,
                 Transfer("unsent", TransferRole.CONSUMER_WRITE, "r", 0.0, peer_engine_id="P",
                          local_block_ids=[1, 2])]
    parked = [Parked(failed, 0.0, needs_quiesce=True, parked_s=1.0),
              Parked(_announced("done", "P", 9, 0.0), 0.0, needs_quiesce=True, parked_s=1.0,
                     quiesced=True),
              Parked(_announced("own ops", "P", 9, 0.0), 0.0, needs_quiesce=False,
                     parked_s=1.0)]
    exposure, _ = _exposure(transfers, parked)
    exposure.review(2.0)
    # 4 + (5 - 2 from its own prefix cache) + 6 parked; acked, quiesced, never announced: no
    assert exposure.at_risk == {"P": 13, "Q": 3}


def test_an_announcement_past_the_producers_share_waits_unless_it_is_alone() -> None:
    exposure, _ = _exposure([], num_blocks=40)  # share: 10 blocks
    assert exposure.cap_blocks == 10
    big = _announced("big", "P", 25, 0.0)
    assert exposure.may_announce(big)  # nothing at risk with P: a long prompt still goes
    assert not exposure.may_announce(_announced("next", "P", 1, 0.0))
    assert exposure.may_announce(_announced("other", "Q", 10, 0.0))  # Q has its own share
    assert not exposure.may_announce(_announced("more", "Q", 1, 0.0))
    big.acknowledged = True
    exposure, _ = _exposure([big])
    exposure.review(1.0)
    assert exposure.may_announce(_announced("next", "P", 10, 0.0))


def test_a_producer_is_silent_after_lease_timeout_owing_an_answer_without_a_word() -> None:
    t = _announced("a", "P", 2, at=10.0, acknowledged=True)  # acknowledged: still owes leases
    exposure, peers = _exposure([t])
    exposure.review(15.0)
    assert not exposure.silent  # 5 s: not past lease_timeout
    exposure.review(15.5)
    assert exposure.silent == {"P": 5.5}
    error = exposure.refusal(_announced("b", "P", 1, 0.0))
    assert error is not None and "prefill P has not answered this decode for 5.5 s" in error
    assert exposure.refusal(_announced("c", "Q", 1, 0.0)) is None
    peers.heard_s["P"] = 9.0  # heard before it began to owe: still silent
    exposure.review(15.5)
    assert "P" in exposure.silent
    peers.heard_s["P"] = 14.0  # it spoke since: silent again only 5 s after that
    exposure.review(15.5)
    assert not exposure.silent
    exposure.review(19.5)
    assert exposure.silent == {"P": 5.5}


def test_a_producer_owing_nothing_is_never_silent() -> None:
    done = _announced("a", "P", 2, at=0.0)
    done.state = TransferState.DONE
    parked = Parked(_announced("p", "P", 2, at=0.0), 0.0, needs_quiesce=True, parked_s=0.0,
                    quiesced=True)
    exposure, _ = _exposure([done], [parked])
    exposure.review(100.0)
    assert not exposure.silent and not exposure.at_risk


def test_an_unanswered_quiesce_counts_from_the_parking() -> None:
    failed = _announced("f", "P", 2, at=0.0)
    failed.state = TransferState.EXPIRED
    exposure, peers = _exposure([], [Parked(failed, 0.0, needs_quiesce=True, parked_s=20.0)])
    peers.heard_s["P"] = 19.0
    exposure.review(25.0)
    assert not exposure.silent
    exposure.review(25.1)
    assert set(exposure.silent) == {"P"} and abs(exposure.silent["P"] - 5.1) < 1e-9
