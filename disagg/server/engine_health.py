"""Whether an engine core can serve: the errors that say it cannot (HTTP 503), and the stall
watch that tells a frozen engine core (silent past its deadline) from a busy one (its heartbeat
thread still beats during a long step)."""

from __future__ import annotations

import asyncio

from connectors.pd_config import parse_timeouts
from disagg.common import envs
from disagg.common.config import EngineConfig

DEFAULT_STALL_TIMEOUT_S = 30.0
"""Stall deadline without DISAGG_ENGINE_STALL_TIMEOUT_S or a P/D connector."""


class EngineStartupError(RuntimeError):
    """An engine core failed to start; the message is one readable line."""


class EngineUnavailableError(RuntimeError):
    """An engine core cannot serve a request now (dead or stalled): HTTP 503."""


class EngineDeadError(EngineUnavailableError):
    """An engine core died after start-up."""


class EngineStalledError(EngineUnavailableError):
    """An engine core alive but silent past the stall deadline (frozen, or its host does not
    run it); unlike a death this passes once it responds again."""


def stall_timeout_s(cfg: EngineConfig) -> float:
    """How long a rank may stay silent: DISAGG_ENGINE_STALL_TIMEOUT_S, else the P/D connector's
    lease_timeout (its peers give up on a frozen rank then), else 30 s."""
    from_env = envs.engine_stall_timeout_s()
    if from_env is not None:
        return from_env
    kt = cfg.kv_transfer
    if kt is None or kt.kv_connector is None:
        return DEFAULT_STALL_TIMEOUT_S
    return parse_timeouts(kt.kv_connector_extra_config).lease_timeout_s


class StallWatch:
    """When each rank was last heard from (any message, heartbeats included), and which ranks
    the watchdog found silent past the deadline (their event is set until heard again)."""

    def __init__(self, dp_size: int, deadline_s: float, now: float) -> None:
        self.deadline_s = deadline_s
        self.last_heard = [now] * dp_size
        self.events = [asyncio.Event() for _ in range(dp_size)]

    def heard(self, rank: int, now: float) -> float | None:
        """Note a message from ``rank``; returns its silence if it was marked stalled."""
        if not 0 <= rank < len(self.last_heard):
            return None
        silent = now - self.last_heard[rank]
        self.last_heard[rank] = max(now, self.last_heard[rank])
        if not self.events[rank].is_set():
            return None
        self.events[rank].clear()
        return silent

    def silent_s(self, rank: int, now: float) -> float:
        """Seconds since ``rank`` was last heard from."""
        return now - self.last_heard[rank]

    def overdue(self, rank: int, now: float) -> bool:
        """Silent longer than the deadline."""
        return self.silent_s(rank, now) > self.deadline_s

    def stalled(self, rank: int) -> bool:
        """Marked stalled by the watchdog and not heard from since."""
        return self.events[rank].is_set()

    def error(self, rank: int, now: float) -> EngineStalledError:
        """The error that fails the rank's requests: names the rank and its silence."""
        return EngineStalledError(
            f"engine core dp{rank} is not responding: silent for "
            f"{self.silent_s(rank, now):.1f} s (stall deadline {self.deadline_s:g} s)")
