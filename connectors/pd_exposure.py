"""A WRITE decode's exposure to each prefill: the blocks it announced that a prefill may write.

Once announced, a failed transfer's blocks stay parked until their producer says it cannot
write them any more (pd_outcome.py). A frozen producer never says so, so whatever is announced
to it ends up parked. This bounds that loss, per producer X:

  at risk    blocks of live transfers announced to X that X has not acknowledged (no lease or
             other message naming the transfer yet), plus parked blocks X has not quiesced.
             A new announcement to X that would take this past MAX_AT_RISK_FRACTION of the pool
             waits (unless nothing is at risk with X: one large prompt still goes): blocks are
             not at risk until announced, so if X stays silent it expires cleanly, never
             parked.
  silent     X owes this decode something (leases of transfers announced to it, an answer to
             a quiesce) and nothing at all has come from it for lease_timeout since it began to
             owe or last spoke. New transfers to X fail before announcing, and the live ones
             announced to it fail too (they would wait for defer_timeout otherwise): their
             prompts are computed here, or fail, by policy (the proxy then retries on another
             prefill), until X speaks again.

A live producer acknowledges an announcement at once when it knows this decode (else at its
next heartbeat, after handshaking us), leases every transfer it holds our blocks for, and
leases the failed ones whose writes it is still draining: it is never silent that long.
Heard is per (engine id, epoch): another process claiming a silent producer's id does not
speak for it (a transfer not yet bound to an epoch takes any epoch of its engine).

What this does not bound: blocks a producer acknowledged (it was working on them) stay parked
if it then freezes; and the acknowledgements come from the producer's engine thread, so one
whose engine step outlasts lease_timeout with nothing else in flight to us is judged silent
until it speaks. An acknowledgement of forged remote_blocks (someone who knows a live
transfer id) makes that transfer count as acknowledged: the cap, not the data, is affected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from connectors.pd_outcome import Parked
from connectors.pd_peers import PeerLinks
from connectors.transfer import Timeouts, Transfer, TransferRole

MAX_AT_RISK_FRACTION = 0.25
"""Of the decode's pool: unacknowledged blocks one producer may hold (each producer has its
own share, so one frozen prefill leaves the others their throughput)."""


def _moved_blocks(t: Transfer) -> int:
    """Blocks the producer writes (those after the decode's own prefix-cache hit)."""
    return max(0, len(t.local_block_ids) - t.skip_blocks)


class Exposure:
    """Per-producer blocks at risk and silence, recomputed each step (engine thread)."""

    def __init__(self, transfers: Mapping[str, Transfer], parked: Mapping[str, Parked],
                 peers: PeerLinks, timeouts: Timeouts, num_blocks: int) -> None:
        self._transfers = transfers
        self._parked = parked
        self._peers = peers
        self._timeouts = timeouts
        self.cap_blocks = max(1, int(num_blocks * MAX_AT_RISK_FRACTION))
        self.at_risk: dict[str, int] = {}
        self.silent: dict[str, float] = {}
        """Silent producers -> seconds since they last spoke (or began to owe)."""

    def review(self, now: float) -> None:
        """Recount what each producer holds and owes (after this step's messages)."""
        at_risk: dict[str, int] = {}
        owes_since: dict[tuple[str, int | None], float] = {}

        def owes(t: Transfer, since: float, risky: bool) -> None:
            peer = (t.peer_engine_id or "", t.peer_epoch)
            owes_since[peer] = min(owes_since.get(peer, now), since)
            if risky:
                at_risk[peer[0]] = at_risk.get(peer[0], 0) + _moved_blocks(t)

        for t in self._live_announced():
            assert t.announced_s is not None
            owes(t, t.announced_s, not t.acknowledged)
        for p in self._parked.values():
            if p.needs_quiesce and not p.quiesced and p.transfer.peer_engine_id is not None:
                owes(p.transfer, p.parked_s, True)
        self.at_risk = at_risk
        self.silent = {}
        for (engine, epoch), since in owes_since.items():
            heard = self._peers.last_heard(engine, epoch)
            quiet_s = now - max(since, since if heard is None else heard)
            if quiet_s > self._timeouts.lease_timeout_s:
                self.silent[engine] = max(quiet_s, self.silent.get(engine, 0.0))

    def _live_announced(self) -> Iterable[Transfer]:
        for t in self._transfers.values():
            if t.role is TransferRole.CONSUMER_WRITE and t.announced_s is not None \
                    and not t.terminal and t.peer_engine_id is not None:
                yield t

    def refusal(self, t: Transfer) -> str | None:
        """Why t's producer gets no blocks and t no KV (its producer is silent), else None."""
        quiet_s = self.silent.get(t.peer_engine_id or "")
        if quiet_s is None:
            return None
        return (f"prefill {t.peer_engine_id} has not answered this decode for {quiet_s:.1f} s "
                "while it holds blocks of it (frozen or unreachable): it is given no more, "
                "and its transfers are given up")

    def may_announce(self, t: Transfer) -> bool:
        """t's blocks fit in its producer's share (counted as at risk once True)."""
        peer = t.peer_engine_id or ""
        held = self.at_risk.get(peer, 0)
        n = _moved_blocks(t)
        if held and held + n > self.cap_blocks:
            return False
        self.at_risk[peer] = held + n
        return True
