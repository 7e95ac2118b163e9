"""The methods a frontend may run on engine cores: a whitelist, never arbitrary names.

    utility (one rank, internal):      stats, ledger, dp_state, kv_abort, kv_faults
    collective_rpc (every rank, HTTP): barrier, stats, ledger, dp_state

``barrier`` is the one collective: it uses the DP group, so in lockstep mode a rank that is
stepping runs it only once every rank has stopped (disagg/dp/lockstep.py says why).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec

COLLECTIVE_METHODS = frozenset({"barrier"})
RPC_METHODS = frozenset({"barrier", "stats", "ledger", "dp_state"})
UTILITY_METHODS = frozenset({"stats", "ledger", "dp_state", "kv_abort", "kv_faults"})
MAX_BARRIER_TIMEOUT_S = 600.0
MAX_STAGGER_S = 10.0


class RpcArgError(ValueError):
    """Unknown method or bad arguments (a user error: HTTP 400)."""


def _number(args: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RpcArgError(f"args.{name} must be a number between {low:g} and {high:g}, "
                          f"got {value!r}")
    return float(value)


def validate_rpc(method: str, args: dict[str, Any], allowed: frozenset[str]) -> None:
    """Raise RpcArgError for a method outside ``allowed`` or arguments it does not take."""
    if method not in allowed:
        raise RpcArgError(f"unknown method {method!r}; allowed: {', '.join(sorted(allowed))}")
    known = {"barrier": {"timeout_s", "stagger_s"}, "kv_abort": {"transfer_id"},
             "kv_faults": {"faults"}}.get(method, set())
    extra = set(args) - known
    if extra:
        raise RpcArgError(f"method {method!r} does not take {sorted(extra)}")
    if method == "barrier":
        _number(args, "timeout_s", 30.0, 0.001, MAX_BARRIER_TIMEOUT_S)
        _number(args, "stagger_s", 0.0, 0.0, MAX_STAGGER_S)
    if method == "kv_abort" and not isinstance(args.get("transfer_id"), str):
        raise RpcArgError("kv_abort needs args.transfer_id (a string)")


@dataclass(slots=True)
class RpcContext:
    """What the methods act on, inside one engine-core process."""

    engine: Any
    group: Any
    """DPGroup, or None with one rank."""
    rank: int
    dp_state: dict[str, Any]


def run_rpc(ctx: RpcContext, method: str, args: dict[str, Any]) -> Any:
    """Run one whitelisted method on this rank (arguments already validated)."""
    engine = ctx.engine
    if method == "stats":
        return {"dp_rank": ctx.rank, **msgspec.to_builtins(engine.stats())}
    if method == "ledger":
        engine.pool.check()
        return engine.pool.snapshot()._asdict()
    if method == "kv_abort":
        return engine.kv_abort(str(args["transfer_id"]))
    if method == "kv_faults":
        return engine.kv_faults(args.get("faults"))
    if method == "dp_state":
        return {"dp_rank": ctx.rank, **ctx.dp_state}
    if method == "barrier":
        return _barrier(ctx, args)
    raise RpcArgError(f"unknown method {method!r}")


def _barrier(ctx: RpcContext, args: dict[str, Any]) -> dict[str, Any]:
    """Every rank meets here (bounded by timeout_s); rank r first sleeps r * stagger_s so
    callers can check that ranks arriving at different times still meet."""
    timeout_s = _number(args, "timeout_s", 30.0, 0.001, MAX_BARRIER_TIMEOUT_S)
    stagger_s = _number(args, "stagger_s", 0.0, 0.0, MAX_STAGGER_S)
    if stagger_s:
        time.sleep(stagger_s * ctx.rank)
    waited = ctx.group.barrier(timeout_s) if ctx.group is not None else 0.0
    return {"dp_rank": ctx.rank, "waited_s": round(waited, 6)}
