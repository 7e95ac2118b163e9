"""Deterministic fault injection for the P/D connector (tests and failure drills).

Configured in ``kv_connector_extra_config.faults`` and refused unless the engine runs with
``DISAGG_FAULT_INJECTION=1`` (connectors/pd_config.py), e.g.::

    "faults": [{"at": "write_done", "action": "drop"},
               {"at": "post", "nth": 7, "action": "fail"},
               {"at": "notify", "action": "delay", "s": 3}]

Points and their actions:
  a control message this engine sends, by tag (remote_blocks, write_done, release, release_ack,
  transfer_failed, lease, quiesce, quiesced) or ``notify`` for any of them:
      drop | delay (``s`` seconds) | duplicate | corrupt (flip a byte of the encoded frame)
  ``post`` (a one-sided op this engine posts): fail | stall (never completes; the connector's
      own deadline must end it)
  ``landed`` (this engine received a transfer's bytes: READ op done, WRITE write_done):
      flip (flip one byte of the first received block, before any check)
  any point: exit (the process dies there, as a crash mid-transfer would)

``nth`` (1-based) fires only on that occurrence of the point; without it every occurrence
fires, up to ``count`` times when given. Counting is per point and per process, so a run is
reproducible.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import msgspec

from disagg.common.config import ConfigError

MESSAGE_POINTS = frozenset({"remote_blocks", "write_done", "first_token", "release",
                            "release_ack",
                            "transfer_failed", "lease", "quiesce", "quiesced", "notify"})
_ACTIONS = {
    **dict.fromkeys(MESSAGE_POINTS, frozenset({"drop", "delay", "duplicate", "corrupt", "exit"})),
    "post": frozenset({"fail", "stall", "exit"}),
    "landed": frozenset({"flip", "exit"}),
}
EXIT_CODE = 70
"""Exit status of a process killed by an ``exit`` fault."""


class Fault(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One fault rule."""

    at: str
    action: str
    nth: int | None = None
    count: int | None = None
    s: float = 0.0


class FaultPlan:
    """The rules of one engine and how often each point was reached (thread-safe)."""

    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults
        self._seen: dict[str, int] = {}
        self._fired: dict[int, int] = {}
        self._lock = threading.Lock()
        self.injected = 0

    def replace(self, other: FaultPlan) -> None:
        """Take ``other``'s rules and start counting afresh (``injected`` keeps counting)."""
        with self._lock:
            self.faults = other.faults
            self._seen, self._fired = {}, {}

    def fire(self, point: str) -> list[Fault]:
        """Count one occurrence of ``point``; the faults that fire on it (an ``exit`` fault
        ends the process here)."""
        with self._lock:
            n = self._seen[point] = self._seen.get(point, 0) + 1
            out = []
            for i, f in enumerate(self.faults):
                if f.at != point and not (f.at == "notify" and point in MESSAGE_POINTS):
                    continue
                if f.nth is not None and f.nth != n:
                    continue
                if f.count is not None and self._fired.get(i, 0) >= f.count:
                    continue
                self._fired[i] = self._fired.get(i, 0) + 1
                out.append(f)
            self.injected += len(out)
        if any(f.action == "exit" for f in out):
            os._exit(EXIT_CODE)
        return out


def parse_faults(raw: Any) -> FaultPlan | None:
    """The ``faults`` option (None when absent); ConfigError on an unknown point or action."""
    if raw is None:
        return None
    try:
        faults = msgspec.convert(raw, list[Fault])
    except msgspec.ValidationError as exc:
        raise ConfigError(f"kv_connector_extra_config.faults: {exc}") from None
    for f in faults:
        allowed = _ACTIONS.get(f.at)
        if allowed is None:
            raise ConfigError(f"faults: unknown point {f.at!r}; known: {sorted(_ACTIONS)}")
        if f.action not in allowed:
            raise ConfigError(f"faults: {f.at} takes {sorted(allowed)}, not {f.action!r}")
        if (f.nth is not None and f.nth < 1) or (f.count is not None and f.count < 1) \
                or not 0 <= f.s <= 3600:
            raise ConfigError("faults: nth and count start at 1, s is in [0, 3600]")
    return FaultPlan(faults)


def corrupt(frame: bytes) -> bytes:
    """The frame with its middle byte flipped."""
    if not frame:
        return frame
    i = len(frame) // 2
    return frame[:i] + bytes([frame[i] ^ 0xFF]) + frame[i + 1:]
