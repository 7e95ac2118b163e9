"""The CPU process group (gloo) among one instance's data-parallel ranks.

    rank 0 hosts the rendezvous store on 127.0.0.1:<port the frontend picked>;
    every rank joins with ProcessGroupGloo; every collective carries its own deadline.

A collective that fails (a peer died: gloo sees the connection close at once) or times out
(a peer hangs) raises DPGroupError. The group is then out of step for good (the ranks no longer
agree on which collective comes next), so the engine core exits and the frontend, seeing a
rank gone, fails open requests and shuts the instance down: no rank waits forever.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

from disagg.engine.tp import make_store

logger = logging.getLogger(__name__)


class DPGroupError(RuntimeError):
    """A collective among the DP ranks failed or timed out; this rank must exit."""


def _delta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


class DPGroup:
    """gloo group of ``size`` ranks; ``sync_state`` and ``barrier`` are its collectives."""

    def __init__(self, rank: int, size: int, port: int, timeout_s: float,
                 rendezvous_timeout_s: float) -> None:
        import torch.distributed as dist

        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        self._dist: Any = dist  # typed Any: torch's stubs lack the gloo backend's methods
        self._store: Any = None
        self._pg: Any = None
        try:
            # The store and the group's default timeout cover the rendezvous (ranks start at
            # different speeds); each collective below passes its own, shorter deadline.
            self._store = make_store(rank, size, port, rendezvous_timeout_s,
                                     wait_for_workers=True)
            self._pg = dist.ProcessGroupGloo(self._store, rank, size,
                                             _delta(rendezvous_timeout_s))
        except Exception as exc:
            raise DPGroupError(f"dp{rank}: cannot join the DP group on 127.0.0.1:{port} "
                               f"within {rendezvous_timeout_s:.0f} s: {exc}") from exc
        logger.info("dp%d: joined the gloo group of %d ranks (port %d)", rank, size, port)

    def sync_state(self, has_unfinished: bool, pending_pause: bool) -> tuple[int, int]:
        """One SUM all-reduce of [has_unfinished, pending_pause]: (ranks with work, ranks
        ready to pause). > 0 answers "any work anywhere", == size "every rank wants to pause"."""
        import torch

        t = torch.tensor([int(has_unfinished), int(pending_pause)], dtype=torch.int64)
        opts = self._dist.AllreduceOptions()
        opts.reduceOp = self._dist.ReduceOp.SUM
        opts.timeout = _delta(self.timeout_s)
        self._run("state all-reduce", lambda: self._pg.allreduce([t], opts))
        return int(t[0]), int(t[1])

    def barrier(self, timeout_s: float | None = None) -> float:
        """Wait (bounded) until every rank reached the barrier; returns the seconds waited."""
        opts = self._dist.BarrierOptions()
        opts.timeout = _delta(self.timeout_s if timeout_s is None else timeout_s)
        t0 = time.monotonic()
        self._run("barrier", lambda: self._pg.barrier(opts))
        return time.monotonic() - t0

    def _run(self, what: str, start: Any) -> None:
        try:
            start().wait()
        except Exception as exc:  # gloo raises RuntimeError for both peer loss and timeout
            raise DPGroupError(f"dp{self.rank}: {what} among {self.size} ranks failed "
                               f"(a peer rank died or hung): {exc}") from exc

    def expert_group(self, device: Any) -> Any:
        """The expert-parallel exchange among these ranks (disagg/dp/expert_group.py), on the
        same rendezvous store; every rank builds it at the same point of start-up."""
        from disagg.dp.expert_group import ExpertGroup
        from disagg.models.expert_parallel import ExpertExchangeError

        try:
            return ExpertGroup(self._store, self.rank, self.size, device, self.timeout_s)
        except ExpertExchangeError as exc:
            raise DPGroupError(str(exc)) from exc

    def close(self) -> None:
        """Drop the group (peers see the connections close)."""
        self._pg = None
        self._store = None
