"""The KV connector interface the engine calls, and the registry that resolves a connector name.

It lives with the engine that calls it; ``connectors/`` holds implementations. Built-in
connectors are registered by import path (loaded on first use, as vLLM's connector factory
does), so the engine never imports the layer above it.

Two halves, as in vLLM's v1 connector API:
  SchedulerConnector (in the scheduler loop): how many prompt tokens arrive from outside, what
      to do after blocks are allocated, whether a finished request's blocks must be held.
  WorkerConnector (next to the KV tensors): register memory, start loads/saves, poll them.
KVConnector bundles both for one engine core and adds the per-step hooks the engine calls.

The connector reports, the scheduler acts (as in vLLM's connector API): the connector never
writes a request's state or frees a block. Each step ``update_connector_output`` returns a
ConnectorOutput (loads that finished or failed, prefills nobody will consume, requests whose
blocks must be parked under a hold because a one-sided op or a peer may still touch them, holds
to free) and the scheduler applies it; ``request_finished`` returns a FinishAction.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from disagg.common.config import ConfigError

if TYPE_CHECKING:
    import torch

    from disagg.common.config import KVTransferConfig
    from disagg.common.kv_transfer_params import KVTransferParams
    from disagg.engine.request import Request
    from disagg.engine.scheduler import SchedulerOutput
    from disagg.models.layers import LayerHook


@dataclass(frozen=True, slots=True)
class LoadFailure:
    """A consumer request's remote KV could not be loaded or vouched for."""

    request_id: str
    error: str
    recompute: bool
    """Prefill locally instead of failing the request (kv_load_failure_policy=recompute)."""


@dataclass(slots=True)
class ConnectorOutput:
    """What the connector found this step; the scheduler acts on it in this order."""

    park: list[tuple[str, str]] = field(default_factory=list)
    """(request id, hold key): move the request's blocks under the hold before anything else
    (a one-sided op or a peer may still write them; the hold is freed via ``free_holds``)."""
    loaded: list[str] = field(default_factory=list)
    """Consumer requests whose KV landed and was vouched for: they may run."""
    first_tokens: list[tuple[str, int]] = field(default_factory=list)
    """(request id, token id): consumer requests told their first output token by the prefill
    that sampled it. The scheduler appends it (before ``loaded``); the request then computes
    its last prompt token and that token in one step instead of recomputing the first."""
    load_failed: list[LoadFailure] = field(default_factory=list)
    producer_failed: list[tuple[str, str]] = field(default_factory=list)
    """(request id, error): prefills whose KV nobody will consume; they end with the error."""
    producer_settled: list[tuple[str, str | None]] = field(default_factory=list)
    """(request id, error or None): finished prefills whose answer waited for their transfer
    (FinishAction.await_transfer); with an error the answer is that error."""
    free_holds: list[str] = field(default_factory=list)
    """Hold keys whose blocks go back to the free pool."""
    transfer_times: list[tuple[str, float | None, float]] = field(default_factory=list)
    """(request id, first post or None, done) of transfers that reached DONE on a side that
    posted ops or received KV (time.monotonic instants): the request's KV-transfer time and
    its wait after the KV arrived (disagg/common/timings.py)."""

    def __bool__(self) -> bool:
        return bool(self.park or self.first_tokens or self.loaded or self.load_failed
                    or self.producer_failed
                    or self.producer_settled or self.free_holds)


@dataclass(frozen=True, slots=True)
class FinishAction:
    """The connector's answer when a request ends."""

    hold_key: str | None = None
    """Keep the request's blocks held under this key (a peer reads them, or an op may still
    touch them); the connector frees the hold later through ConnectorOutput.free_holds."""
    error: str | None = None
    """End the request with this error instead (a prefill whose KV nobody can consume)."""
    kv_transfer_params: KVTransferParams | None = None
    """Params to return to the caller (a READ prefill's block ids for the decode)."""
    await_transfer: bool = False
    """Hold the request's answer until ConnectorOutput.producer_settled names it."""


class SchedulerConnector(Protocol):
    """Scheduler-side half."""

    def get_num_new_matched_tokens(self, req: Request) -> int:
        """Prompt tokens whose KV will arrive from a remote instance (0: compute locally)."""
        ...

    def can_schedule(self, req: Request) -> bool:
        """False to keep a waiting request out of this step (it stays queued)."""
        ...

    def update_state_after_alloc(self, req: Request) -> None:
        """The request's blocks are allocated; start receiving into them. The first
        ``req.num_cached_tokens // block_size`` of them are the engine's own cached prefix
        (shared, already holding that KV): a connector must not write them."""
        ...

    def request_finished(self, req: Request) -> FinishAction:
        """A request ended: hold its blocks, turn it into an error, or nothing."""
        ...


class WorkerConnector(abc.ABC):
    """Worker-side half: owns the transport and the registered KV memory."""

    @abc.abstractmethod
    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """Register the engine's single KV tensor with the transport."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release transport resources."""


class KVConnector(abc.ABC):
    """What the engine core holds: both halves plus the per-step hooks."""

    scheduler: SchedulerConnector
    host: str | None = None
    handshake_port: int | None = None
    notify_port: int | None = None
    mode: str | None = None

    @abc.abstractmethod
    def update_connector_output(self) -> ConnectorOutput:
        """Each step: consume notifications, poll transfers, reap expired work; returns what
        the scheduler must apply."""

    def on_request_arrival(self, req: Request) -> None:
        """A request entered the engine (before scheduling)."""

    def on_request_queued(self, req: Request) -> None:
        """The request entered the scheduler's queue: right after its arrival, or at resume
        for one held or queued during a pause (it waits for blocks from here)."""

    def on_request_paused(self, req: Request) -> None:
        """The engine paused with this request queued: its wait stops counting until
        on_request_queued at resume."""

    def before_execute(self, out: SchedulerOutput) -> None:
        """Hook before the model runs a step."""

    def layer_hook(self, out: SchedulerOutput) -> LayerHook | None:
        """Called after before_execute: a callback the model calls with each layer's index
        once that layer's K/V of this step are in the cache (e.g. to stream them out while
        later layers compute), or None when there is nothing to do per layer this step."""
        return None

    def after_execute(self, out: SchedulerOutput) -> None:
        """Hook after the model ran a step (KV of the step is in the cache)."""

    def step_needs_hooks(self, out: SchedulerOutput) -> bool:
        """Whether this step needs its hooks (before_execute, layer_hook, after_execute) or
        has a request whose transfer is still live. False lets async scheduling launch the
        step with no hook run and read its tokens a step later (EngineCore._step_ahead): a
        decode-only batch of requests whose KV already landed. Default True: a connector that
        does not say is stepped synchronously."""
        return True

    @abc.abstractmethod
    def busy(self) -> bool:
        """Transfers or holds are outstanding (the engine must keep stepping)."""

    def needs_polling(self) -> bool:
        """Work whose progress only polling sees (one-sided ops in flight): the engine loop
        then polls every millisecond. False while the connector only waits for what rings
        its doorbell (a peer's message, a handshake) or for its second-scale timers: the loop
        then sleeps, and leaves the CPU to a prefill sharing the host. Default: ``busy()``."""
        return self.busy()

    def set_wakeup(self, wake: Callable[[], None]) -> None:
        """The engine loop's doorbell, set once before serving: call ``wake()`` (from any
        thread; it never blocks) when something arrived that the next
        update_connector_output acts on (a peer's message, a finished handshake), so an idle
        loop steps at once instead of at its next poll. Default: none (the loop polls)."""

    @abc.abstractmethod
    def metrics(self) -> dict[str, float]:
        """Counters and gauges for /metrics."""

    def fail_all(self, error: str) -> None:
        """The engine is going down: fail every live transfer toward its peer (they free at
        once instead of waiting for a lease to run out). Default: nothing to fail."""

    @abc.abstractmethod
    def abort_transfer(self, transfer_id: str) -> bool:
        """Drop a transfer (proxy cleanup); True if it was known."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop threads and release resources."""


ConnectorFactory = Callable[["KVTransferConfig", Any, "torch.Tensor"], KVConnector]
_REGISTRY: dict[str, ConnectorFactory] = {}
_BUILTIN = {"PDConnector": "connectors.pd_connector:PDConnector"}
"""Connectors that ship with disagg, by import path."""


def register_connector(name: str, factory: ConnectorFactory) -> None:
    """Make a connector available by name in ``kv_connector``."""
    _REGISTRY[name] = factory


def resolve_connector(name: str) -> ConnectorFactory:
    """A registered name, or ``package.module:ClassOrFactory`` for third-party connectors."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    name = _BUILTIN.get(name, name)
    if ":" in name:
        module_name, attr = name.split(":", 1)
        try:
            return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import kv_connector {name!r}: {exc}") from exc
    raise ValueError(f"unknown kv_connector {name!r}; known: "
                     f"{sorted({*_REGISTRY, *_BUILTIN})} (or give module:Class)")


def create_connector(cfg: KVTransferConfig, engine: Any, kv_cache: torch.Tensor) -> KVConnector:
    """Resolve ``cfg.kv_connector`` (a name or an import path) and construct the connector."""

    assert cfg.kv_connector is not None
    try:
        factory = resolve_connector(cfg.kv_connector)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return factory(cfg, engine, kv_cache)


def check_connector_config(cfg: KVTransferConfig, data_parallel_size: int = 1,
                           tensor_parallel_size: int = 1) -> None:
    """Resolve ``cfg.kv_connector`` and let it check its options (a ``check_config(cfg,
    data_parallel_size, tensor_parallel_size)`` static method, when it has one) before the
    instance loads anything: a typo or a bad value is one ConfigError at start, not an error
    after minutes of weight loading."""
    if cfg.kv_connector is None:
        return
    try:
        factory = resolve_connector(cfg.kv_connector)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    check = getattr(factory, "check_config", None)
    if check is not None:
        check(cfg, data_parallel_size, tensor_parallel_size)


def supports_tensor_parallel(cfg: KVTransferConfig) -> bool:
    """Whether ``cfg.kv_connector`` has a per-rank half (``make_rank_worker``)."""
    assert cfg.kv_connector is not None
    try:
        factory = resolve_connector(cfg.kv_connector)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return getattr(factory, "make_rank_worker", None) is not None


def create_rank_worker(cfg: KVTransferConfig, engine_id: str, tp_rank: int,
                       kv_cache: torch.Tensor, dp_rank: int = 0) -> Any:
    """The per-rank half of ``cfg.kv_connector`` in a tensor-parallel worker process: the
    connector class's ``make_rank_worker(cfg, engine_id, tp_rank, kv_cache, dp_rank)``, an
    object with ``descriptor()``, ``rpc(method, args)`` and ``close()``."""
    if not supports_tensor_parallel(cfg):
        raise ConfigError(f"kv_connector {cfg.kv_connector!r} does not support tensor "
                          "parallelism (it has no make_rank_worker)")
    make = resolve_connector(str(cfg.kv_connector)).make_rank_worker  # type: ignore[attr-defined]
    return make(cfg, engine_id, tp_rank, kv_cache, dp_rank)
