"""The instance registry: who is in the prefill and decode pools, their health and their load.

Owned by the proxy's event loop (no locks). Instances enter from the command line (static),
the admin API, or heartbeats (dynamic). Only HEALTHY instances are routed to:

    PENDING --probe ok--> HEALTHY --probe/connection failure--> UNHEALTHY --probe ok--> HEALTHY
       \\--bad role/mode--> REJECTED          (admin) drain: any state --> DRAINING
A dynamic instance that misses heartbeats, or deregisters, is removed outright.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.config import TransferMode
from proxy.registration import Heartbeat, InstanceInfo, KVRole

logger = logging.getLogger(__name__)


class Pool(enum.Enum):
    """The two pools the proxy routes to."""

    PREFILL = "prefill"
    DECODE = "decode"


DOWN_AFTER_EXTRA_FAILURES = 2
"""Failed probe rounds past leaving the rotation before waiting requests are failed."""


class InstanceState(enum.Enum):
    """Where an instance stands; only HEALTHY receives new requests."""

    PENDING = "pending"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    REJECTED = "rejected"
    DRAINING = "draining"


class Origin(enum.Enum):
    """How an instance entered the registry (dynamic ones expire without heartbeats)."""

    STATIC = "static"
    ADMIN = "admin"
    DYNAMIC = "dynamic"


_ROLES_BY_POOL = {
    Pool.PREFILL: frozenset({KVRole.PRODUCER, KVRole.BOTH}),
    Pool.DECODE: frozenset({KVRole.CONSUMER, KVRole.BOTH}),
}


@dataclass(slots=True, eq=False)
class Instance:
    """One upstream instance and the proxy's running view of it."""

    url: str
    pool: Pool
    origin: Origin
    state: InstanceState = InstanceState.PENDING
    info: InstanceInfo | None = None
    last_error: str | None = None
    expires_at_s: float | None = None
    """Monotonic deadline for the next heartbeat (dynamic instances only)."""
    consecutive_failures: int = 0
    down: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the proxy gave up on it (Registry.given_up: dead, or frozen): requests waiting
    on it fail at once (upstream.while_up) instead of at their own deadline; a fresh event
    once a probe passes again."""
    outstanding_requests: int = 0
    outstanding_tokens: int = 0
    total_requests: int = 0

    def to_json(self) -> dict[str, object]:
        """The admin API's view of this instance."""
        info = self.info
        return {"url": self.url, "pool": self.pool.value, "origin": self.origin.value,
                "state": self.state.value, "last_error": self.last_error,
                "engine_id": info.engine_id if info else None,
                "role": info.role.value if info else None,
                "mode": info.mode.value if info and info.mode else None,
                "max_model_len": info.max_model_len if info else None,
                "outstanding_requests": self.outstanding_requests,
                "outstanding_tokens": self.outstanding_tokens,
                "total_requests": self.total_requests}


def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port``; refuses other schemes."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"instance URL {url!r} must be http://HOST:PORT")
    return url


def pool_for_role(role: KVRole) -> Pool:
    """The pool a self-registering instance joins (kv_both can prefill locally: decode)."""
    return Pool.PREFILL if role is KVRole.PRODUCER else Pool.DECODE


def check_info(info: InstanceInfo, pool: Pool, mode: TransferMode) -> str | None:
    """Why this instance cannot serve in ``pool`` under ``mode``, or None when it can."""
    if info.role not in _ROLES_BY_POOL[pool]:
        return f"role {info.role.value} cannot serve in the {pool.value} pool"
    if info.mode is not None and info.mode is not mode:
        return f"instance runs KV mode {info.mode.value}, the proxy runs {mode.value}"
    has_kv_address = None not in (info.kv_host, info.kv_handshake_port, info.kv_notify_port)
    if mode is TransferMode.WRITE and info.role is not KVRole.BOTH and not has_kv_address:
        return "WRITE mode needs kv_host, kv_handshake_port and kv_notify_port"
    return None


class Registry:
    """Both pools, keyed by instance URL."""

    def __init__(self, mode: TransferMode, max_missed_heartbeats: int = 3,
                 unhealthy_after_failures: int = 3,
                 on_removed: Callable[[str], None] | None = None) -> None:
        self._mode = mode
        self._max_missed_heartbeats = max_missed_heartbeats
        self._unhealthy_after_failures = unhealthy_after_failures
        self._instances: dict[str, Instance] = {}
        self._on_removed = on_removed
        """Told the URL of every instance that leaves (removed or expired)."""

    def add(self, url: str, pool: Pool, origin: Origin) -> Instance:
        """Add an instance (PENDING until probed); re-adding a known URL returns it unchanged."""
        url = normalize_url(url)
        existing = self._instances.get(url)
        if existing is not None:
            return existing
        inst = Instance(url=url, pool=pool, origin=origin)
        self._instances[url] = inst
        logger.info("added %s instance %s (%s)", pool.value, url, origin.value)
        return inst

    def remove(self, url: str) -> bool:
        """Remove an instance; in-flight requests to it finish on their own."""
        inst = self._instances.pop(normalize_url(url), None)
        if inst is not None:
            logger.info("removed %s instance %s", inst.pool.value, inst.url)
            self._removed(inst)
        return inst is not None

    def drain(self, url: str) -> Instance | None:
        """Stop routing new requests to an instance; it stays listed until removed."""
        inst = self.get(url)
        if inst is not None:
            inst.state = InstanceState.DRAINING
        return inst

    def get(self, url: str) -> Instance | None:
        """The instance at ``url``, if registered."""
        return self._instances.get(normalize_url(url))

    def instances(self, pool: Pool | None = None) -> list[Instance]:
        """Every instance (of one pool), in registration order."""
        return [i for i in self._instances.values() if pool is None or i.pool is pool]

    def healthy(self, pool: Pool) -> list[Instance]:
        """The instances new requests may go to."""
        return [i for i in self._instances.values()
                if i.pool is pool and i.state is InstanceState.HEALTHY]

    def apply_info(self, inst: Instance, info: InstanceInfo) -> None:
        """A successful probe or heartbeat: store the info, accept or reject the instance."""
        inst.info = info
        inst.consecutive_failures = 0
        if inst.state is InstanceState.DRAINING:
            return
        reason = check_info(info, inst.pool, self._mode)
        if reason is not None:
            if inst.state is not InstanceState.REJECTED:
                logger.error("rejected %s instance %s: %s", inst.pool.value, inst.url, reason)
            inst.state, inst.last_error = InstanceState.REJECTED, reason
            return
        if inst.state is not InstanceState.HEALTHY:
            logger.info("%s instance %s is healthy", inst.pool.value, inst.url)
        inst.state, inst.last_error = InstanceState.HEALTHY, None
        if inst.down.is_set():
            inst.down = asyncio.Event()

    def mark_failed(self, inst: Instance, reason: str, *, definite: bool = True) -> None:
        """A failed probe or connection: out of rotation until a probe passes.

        ``definite=False`` (a slow probe: busy or hung?) only counts; the instance leaves
        after ``unhealthy_after_failures`` such failures in a row.
        """
        inst.last_error = reason
        inst.consecutive_failures += 1
        if not definite and inst.consecutive_failures < self._unhealthy_after_failures:
            return
        if inst.state in (InstanceState.HEALTHY, InstanceState.PENDING):
            logger.warning("%s instance %s is unhealthy: %s", inst.pool.value, inst.url, reason)
            inst.state = InstanceState.UNHEALTHY

    def given_up(self, inst: Instance, *, definite: bool) -> bool:
        """Whether the requests waiting on ``inst`` should stop waiting: it is out of rotation
        and its connections are refused (dead), or its probes kept timing out for
        ``DOWN_AFTER_EXTRA_FAILURES`` more rounds than it took to leave the rotation (frozen:
        a busy instance answers a probe within a few rounds)."""
        if inst.state is not InstanceState.UNHEALTHY:
            return False
        return definite or (inst.consecutive_failures
                            >= self._unhealthy_after_failures + DOWN_AFTER_EXTRA_FAILURES)

    def on_heartbeat(self, msg: Heartbeat, now_s: float | None = None) -> Instance | None:
        """Register or refresh a dynamic instance; returns it (None if its URL is unusable)."""
        now_s = time.monotonic() if now_s is None else now_s
        try:
            inst = self.add(msg.info.http_url, pool_for_role(msg.info.role), Origin.DYNAMIC)
        except ValueError as exc:
            logger.warning("ignored a heartbeat: %s", exc)
            return None
        if inst.origin is Origin.DYNAMIC:
            inst.expires_at_s = now_s + self._max_missed_heartbeats * msg.interval_s
        if inst.info is None or inst.state is InstanceState.PENDING:
            self.apply_info(inst, msg.info)
        else:
            inst.info = msg.info
        return inst

    def expire(self, now_s: float | None = None) -> list[Instance]:
        """Remove dynamic instances whose heartbeats stopped; returns them."""
        now_s = time.monotonic() if now_s is None else now_s
        gone = [i for i in self._instances.values()
                if i.expires_at_s is not None and i.expires_at_s < now_s]
        for inst in gone:
            logger.warning("%s instance %s missed its heartbeats", inst.pool.value, inst.url)
            del self._instances[inst.url]
            self._removed(inst)
        return gone

    def _removed(self, inst: Instance) -> None:
        if self._on_removed is not None:
            self._on_removed(inst.url)

    @staticmethod
    def acquire(inst: Instance, num_tokens: int) -> None:
        """Count one more outstanding request (and its tokens) against ``inst``."""
        inst.outstanding_requests += 1
        inst.outstanding_tokens += num_tokens
        inst.total_requests += 1

    @staticmethod
    def release(inst: Instance, num_tokens: int) -> None:
        """Undo one ``acquire``."""
        inst.outstanding_requests -= 1
        inst.outstanding_tokens -= num_tokens

    def min_max_model_len(self) -> int | None:
        """Smallest max_model_len over healthy instances of both pools."""
        lens = [i.info.max_model_len for i in self._instances.values()
                if i.state is InstanceState.HEALTHY and i.info is not None]
        return min(lens) if lens else None

    def largest_max_model_len(self, pool: Pool) -> int | None:
        """Largest max_model_len over the pool's healthy instances (None: none known)."""
        lens = [i.info.max_model_len for i in self._instances.values()
                if i.pool is pool and i.state is InstanceState.HEALTHY and i.info is not None]
        return max(lens) if lens else None

    def model_name(self) -> str | None:
        """The served model's name, as a healthy instance reports it."""
        names = self.model_names()
        return names[0] if names else None

    def model_root(self) -> str | None:
        """The served model as loaded (directory or id), as a healthy instance reports it."""
        for inst in self._instances.values():
            if inst.state is InstanceState.HEALTHY and inst.info and inst.info.model_root:
                return inst.info.model_root
        return None

    def model_names(self) -> tuple[str, ...]:
        """The served model's name and aliases, as a healthy instance reports them."""
        for inst in self._instances.values():
            if inst.state is InstanceState.HEALTHY and inst.info and inst.info.model:
                return (inst.info.model, *inst.info.model_aliases)
        return ()
