"""Pause and resume: the modes, one rank's state, and the instance-wide state the frontend keeps.

    mode    in-flight requests                      requests that arrive while paused
    abort   end at once with an error (PAUSE_ABORT)  held; they run after resume
    wait    run to completion, then the rank stops   held; they run after resume
    keep    frozen where they are (blocks kept)      held; they run after resume

One rank (engine core):   RUNNING --pause--> PENDING --ready (+ consensus in lockstep)--> PAUSED
                          PENDING | PAUSED --resume--> RUNNING
"ready" is immediate for abort and keep, and waits for the rank's in-flight requests for wait.
In lockstep mode PENDING lasts until the state all-reduce shows every rank ready (two-phase
pause, disagg/dp/lockstep.py), so all ranks stop at the same collective.

The instance (frontend): RUNNING --pause--> PAUSING --every rank PAUSED--> PAUSED
                         PAUSING | PAUSED --resume--> RUNNING
A pause while PAUSING/PAUSED, or a resume while RUNNING, is a PauseConflict (HTTP 409).
A paused rank keeps running its KV connector, so peers' transfers finish or fail explicitly.
"""

from __future__ import annotations

import asyncio
import enum

PAUSE_ABORT_ERROR = ("request aborted: the instance was paused with mode=abort "
                     "(POST /pause); send it again after POST /resume")


class PauseMode(enum.Enum):
    """What a pause does to requests already in the engine."""

    ABORT = "abort"
    WAIT = "wait"
    KEEP = "keep"


class RankPauseState(enum.Enum):
    """One engine core's pause state."""

    RUNNING = "running"
    PENDING = "pending"
    """Asked to pause; still stepping (draining for wait, or waiting for the other ranks)."""
    PAUSED = "paused"


class InstancePauseState(enum.Enum):
    """The whole instance's pause state, as the frontend reports it."""

    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"


class PauseConflict(Exception):
    """A pause during a pause, or a resume without one (the HTTP layer answers 409)."""


class RankPause:
    """One rank's pause state: whether it may schedule, admit, and when it may stop."""

    def __init__(self) -> None:
        self.state = RankPauseState.RUNNING
        self.mode: PauseMode | None = None
        self.seq = 0

    @property
    def admits_new(self) -> bool:
        """New requests go to the scheduler (else they are held until resume)."""
        return self.state is RankPauseState.RUNNING

    @property
    def may_schedule(self) -> bool:
        """The model may run this rank's requests (wait mode drains while pending)."""
        return self.state is RankPauseState.RUNNING or (
            self.state is RankPauseState.PENDING and self.mode is PauseMode.WAIT)

    def begin(self, seq: int, mode: PauseMode) -> None:
        """Phase one: mark this rank pending (the caller aborts in-flight work for abort)."""
        self.state, self.mode, self.seq = RankPauseState.PENDING, mode, seq

    def ready(self, has_inflight: bool) -> bool:
        """Pending and free to stop: at once for abort/keep, once drained for wait."""
        return self.state is RankPauseState.PENDING and (
            self.mode is not PauseMode.WAIT or not has_inflight)

    def complete(self) -> None:
        """Phase two: stop (every rank agreed, or no agreement is needed)."""
        self.state = RankPauseState.PAUSED

    def resume(self, seq: int) -> None:
        """Back to running (the caller releases held requests)."""
        self.state, self.mode, self.seq = RankPauseState.RUNNING, None, seq


class FrontendPause:
    """The instance-wide state, driven by commands sent and by the ranks' status reports.

    Commands are numbered (``seq``); a report counts only for the latest command, so a late
    report of an older pause or resume never moves the state.
    """

    def __init__(self, dp_size: int) -> None:
        self.dp_size = dp_size
        self.state = InstancePauseState.RUNNING
        self.mode: PauseMode | None = None
        self.seq = 0
        self._target = RankPauseState.RUNNING
        self._acked: set[int] = set()
        self._done: asyncio.Event = asyncio.Event()
        self._done.set()
        self._confirmed_seq = 0
        """The latest command every rank confirmed."""

    def begin_pause(self, mode: PauseMode) -> int:
        """Start a pause; returns the command number to send to every rank."""
        current = self.mode.value if self.mode else "?"
        if self.state is InstancePauseState.PAUSED:
            raise PauseConflict(f"the instance is already paused (mode={current}); "
                                "POST /resume first")
        if self.state is InstancePauseState.PAUSING:
            raise PauseConflict(f"a pause (mode={current}) is already in progress; wait for "
                                "it (GET /is_paused) or POST /resume to cancel it")
        self.state, self.mode = InstancePauseState.PAUSING, mode
        return self._next(RankPauseState.PAUSED)

    def begin_resume(self) -> int:
        """Resume (also cancels a pause still in progress); returns the command number."""
        if self.state is InstancePauseState.RUNNING:
            raise PauseConflict("the instance is not paused; POST /pause first")
        self.state, self.mode = InstancePauseState.RUNNING, None
        return self._next(RankPauseState.RUNNING)

    def _next(self, target: RankPauseState) -> int:
        self.seq += 1
        self._target, self._acked = target, set()
        self._done.set()  # whoever waits for the command this one supersedes: it is over
        self._done = asyncio.Event()
        return self.seq

    def on_report(self, dp_rank: int, seq: int, state: RankPauseState) -> None:
        """A rank applied command ``seq``; the instance is PAUSED once every rank is."""
        if seq != self.seq or state is not self._target:
            return
        self._acked.add(dp_rank)
        if len(self._acked) < self.dp_size:
            return
        if self._target is RankPauseState.PAUSED:
            self.state = InstancePauseState.PAUSED
        self._confirmed_seq = seq
        self._done.set()

    def missing(self) -> list[int]:
        """Ranks that have not confirmed the latest command yet."""
        return sorted(set(range(self.dp_size)) - self._acked)

    async def wait(self, seq: int, timeout_s: float) -> bool:
        """Wait (bounded) until every rank confirmed command ``seq``; False on timeout.
        PauseConflict when a later command superseded it first (a resume cancelled this
        pause, a pause came before every rank resumed): that waiter ends at once, not at its
        deadline."""
        if seq == self.seq:
            try:
                await asyncio.wait_for(self._done.wait(), timeout_s)
            except asyncio.TimeoutError:
                return False
        if self._confirmed_seq == seq:  # done, whatever came after it
            return True
        if self._target is RankPauseState.RUNNING:
            raise PauseConflict("the pause was cancelled by POST /resume before every rank "
                                "paused")
        raise PauseConflict("a POST /pause came before every rank confirmed the resume; the "
                            "instance is pausing")

    def as_json(self) -> dict[str, object]:
        """The GET /is_paused body."""
        return {"paused": self.state is InstancePauseState.PAUSED, "state": self.state.value,
                "mode": self.mode.value if self.mode else None}
