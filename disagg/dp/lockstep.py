"""Lockstep data parallelism (what expert-parallel MoE needs): waves and the two-phase pause.

Every rank steps together inside a *wave*; a rank without requests runs dummy steps. Every
SYNC_INTERVAL_STEPS steps the ranks all-reduce [has_unfinished, pending_pause] (one SUM):

    sum(pending_pause) == dp_size        -> every rank stops here, PAUSED   (wave += 1)
    sum(has_unfinished) == 0 and
    sum(pending_pause) == 0              -> every rank stops here, idle     (wave += 1)
    otherwise                            -> every rank keeps stepping

Why no rank can be left alone inside a collective (the vLLM deadlock, seed note 003):
  * a wave ENDS only on an all-reduce result, which every rank sees identically;
  * a wave STARTS only on EngineCoreStartWave(wave) from the frontend, which sends it to every
    rank under the same lock as pause, resume and collective RPCs (one order on every socket).
    An idle rank that gets a request does not start alone: it asks (EngineCoreNeedWave).
  * a start for a wave that already ended is stale and ignored; so is any start while paused
    (a request held during a pause never wakes one rank into the all-reduce);
  * a pause asked while idle starts the pause consensus on every rank at the same point;
  * a collective RPC (barrier) read while stepping waits until the ranks stop, so it always
    comes right after the same all-reduce on every rank.
"""

from __future__ import annotations

import enum
from typing import Protocol

SYNC_INTERVAL_STEPS = 32


class WaveEnd(enum.Enum):
    """What the ranks agreed after a step."""

    CONTINUE = "continue"
    DONE = "done"
    """No work anywhere: every rank stops stepping."""
    PAUSED = "paused"
    """Every rank is ready to pause: all stop together."""


class StateSync(Protocol):
    """The one collective lockstep needs (DPGroup.sync_state)."""

    def sync_state(self, has_unfinished: bool, pending_pause: bool) -> tuple[int, int]:
        """SUM over ranks of the two flags."""
        ...


class Lockstep:
    """One rank's view of the waves: running or idle, which wave, steps since its start."""

    def __init__(self, group: StateSync, dp_size: int) -> None:
        self.group = group
        self.dp_size = dp_size
        self.wave = 0
        self.running = False
        self.steps = 0
        self.stale_starts = 0
        """Start-wave messages ignored (stale, or arrived while paused)."""
        self._asked_for: int | None = None

    def on_start_wave(self, wave: int, paused: bool) -> bool:
        """The frontend started ``wave``; returns False when it is ignored as stale."""
        if paused or wave < self.wave:
            self.stale_starts += 1
            return False
        self.wave = wave  # == self.wave, unless a start outran our own wave end (defensive)
        self._run()
        return True

    def start_for_pause(self) -> None:
        """A pause reached an idle rank: step so the consensus all-reduce can happen."""
        self._run()

    def _run(self) -> None:
        if not self.running:
            self.running, self.steps = True, 0

    def wave_to_request(self, has_work: bool) -> int | None:
        """When idle with work: the wave to ask the frontend to start (once per wave)."""
        if self.running or not has_work or self._asked_for == self.wave:
            return None
        self._asked_for = self.wave
        return self.wave

    def after_step(self, has_unfinished: bool, pause_ready: bool) -> WaveEnd:
        """Count a (real or dummy) step; every SYNC_INTERVAL_STEPS steps, agree what next."""
        self.steps += 1
        if self.steps % SYNC_INTERVAL_STEPS:
            return WaveEnd.CONTINUE
        num_unfinished, num_ready = self.group.sync_state(has_unfinished, pause_ready)
        if num_ready == self.dp_size:
            return self._stop(WaveEnd.PAUSED)
        if num_unfinished == 0 and num_ready == 0:
            return self._stop(WaveEnd.DONE)
        return WaveEnd.CONTINUE

    def _stop(self, why: WaveEnd) -> WaveEnd:
        self.running, self.steps = False, 0
        self.wave += 1  # every start for the wave that just ended is now stale
        return why

    def as_json(self) -> dict[str, object]:
        """For the dp_state RPC."""
        return {"wave": self.wave, "running": self.running, "steps": self.steps,
                "stale_wave_starts": self.stale_starts}
