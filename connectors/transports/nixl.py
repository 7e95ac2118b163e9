"""KV transport over NVIDIA NIXL (UCX backend by default); host (DRAM) or GPU (VRAM) memory.

NIXL calls used (``nixl._api``, checked against nixl 1.5)::

    nixl_agent(name, nixl_agent_config(backends=["UCX"], num_threads=...))
    agent.register_memory(tensor)            # DRAM for CPU tensors, VRAM for GPU tensors
    agent.get_agent_metadata() -> bytes      # goes into our descriptor
    agent.add_remote_agent(metadata) -> name / agent.remove_remote_agent(name)
    agent.get_xfer_descs(Nx3 uint64 array of (addr, len, dev), "DRAM" | "VRAM")
    agent.initialize_xfer("READ" | "WRITE", local_descs, remote_descs, remote_name)
    agent.transfer(xfer) / agent.check_xfer_state(xfer) -> "DONE" | "PROC" | "ERR"
    agent.release_xfer_handle(xfer) / agent.deregister_memory(reg_descs)

The descriptor is msgpack: the agent metadata blob plus the region's base address, size,
device id and memory type, so a peer can address any byte range of the region. Agent calls are
serialized by one lock (the agent is created in NIXL's no-thread-sync mode).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import torch

from connectors.transports.base import (
    Batch,
    TransferOp,
    TransferStatus,
    Transport,
    TransportError,
    merge_array,
    split_runs,
)
from connectors.transports.handles import HandleTable
from connectors.transports.validation import build_options, open_batch

logger = logging.getLogger(__name__)

DESCRIPTOR_VERSION = 1
SGL_ENV = "NIXL_UCX_SGL_ENABLE"
GPU_UCX_PARAMS = (("num_threads", "4"), ("split_batch_size", "64"))
"""UCX backend parameters for a VRAM region when the options set none: 4 worker threads, a
request split past 64 descriptors. With SGL, on 2x H200 (256 x 2 MiB): WRITE 74-84 %, READ
45-52 % of the peer-copy rate; NIXL's defaults gave 20-41 %.

READ stays lower because NIXL 1.5's UCX backend takes the scatter-gather path only for WRITE
(``prepXfer``: SGL when the operation is ``NIXL_WRITE``): a READ is one ``ucp_get`` per
descriptor, which UCX cuda_ipc runs as one ``cuMemcpyDtoDAsync`` pull per block on one stream
per worker. Each pulled copy costs the copy engine ~10 us of setup: in one process one runtime
memcpy per block pulled reaches 38-46 % (``bench/peer_copy_probe.py``, ``ce_runs`` pull), the
same band as nixl READ. It also shows on the host: ``transfer()`` of a 256-descriptor READ
returns after ~650 us with these 4 threads (1.2 ms on one), a WRITE after ~270 us.
``UCX_PROTO_INFO`` shows both as zero-copy cuda_ipc. Tried without gain: 2-8 threads,
``split_batch_size``, ``split``, ``num_workers``, ``UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y``
(51.7 %), and spreading a batch over 2-8 NIXL agents, i.e. separate UCX contexts and streams
(49-52 %). The layout does not matter either: 256 unmerged descriptors of adjacent blocks read
at 52-54 %. (DESIGN.md §8 lists 242-304 GB/s for a NIXL READ of 256 x 2 MiB, conditions not
stated; NIXL 1.5.1 with its UCX 1.23 did not reproduce it.) Between GPUs, WRITE mode is the
fast one with nixl."""


class NixlDescriptor(msgspec.Struct, frozen=True):
    """This side as a NIXL peer sees it."""

    transport: str
    version: int
    agent_name: str
    metadata: bytes
    base_addr: int
    region_bytes: int
    device_id: int
    mem_type: str
    """``DRAM`` or ``VRAM``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NixlOptions:
    """Knobs of the nixl transport."""

    backends: tuple[str, ...] = ("UCX",)
    """NIXL backend plugins to create."""
    num_threads: int = 0
    """Backend worker threads (0 = NIXL's default)."""
    num_workers: int = 0
    """UCX backend ``num_workers`` (UCX workers; 0 = NIXL's default of 1)."""
    ucx_params: tuple[tuple[str, str], ...] | Mapping[str, object] = ()
    """More UCX backend init parameters, e.g. ``{"split_batch_size": "64"}`` (NIXL splits a
    request over its ``num_threads`` workers only past that many descriptors, 1024 by
    default)."""

    sgl: bool | None = None
    """Batch a request's descriptors into one scatter-gather copy (UCX 1.23 cuda_ipc:
    ``cuMemcpyBatchAsync``) by exporting ``NIXL_UCX_SGL_ENABLE=1`` before the agent exists;
    None = on for VRAM regions."""
    split: int = 1
    """Post a batch as up to this many NIXL requests of about equal bytes, all in flight at
    once (with several UCX workers or threads they progress in parallel); the handle is DONE
    when all are."""
    op_timeout_s: float | None = 120.0
    """Backstop: a batch still PENDING this long after post is failed by poll."""
    progress_delay_us: int = 100
    """Sleep of NIXL's progress thread between progress rounds (its ``pthrDelay``). nixl's
    Python API hard-codes 0, a busy loop: about one core per idle instance. 100 us costs about
    3% of a core and at most that much latency per completion; 0 restores the busy loop."""

    def __post_init__(self) -> None:
        for name in ("num_threads", "num_workers", "progress_delay_us"):
            if getattr(self, name) < 0:
                raise ValueError(f"nixl option {name} must be >= 0, got {getattr(self, name)}")
        if self.split < 1:
            raise ValueError(f"nixl option split must be >= 1, got {self.split}")
        if isinstance(self.ucx_params, Mapping):  # from JSON config: freeze it
            object.__setattr__(self, "ucx_params",
                               tuple(sorted((str(k), str(v)) for k, v in self.ucx_params.items())))


@dataclass(slots=True)
class _Peer:
    remote_name: str
    desc: NixlDescriptor


@dataclass(slots=True)
class _Local:
    tensor: torch.Tensor
    """Held so the registered memory cannot be freed while NIXL may touch it."""
    reg_descs: Any
    base_addr: int
    nbytes: int
    device_id: int
    mem_type: str


def _import_nixl() -> Any:
    """The ``nixl._api`` module, or a TransportError saying how to get it."""
    try:
        from nixl import _api
    except ImportError as exc:
        raise TransportError(f"nixl is not installed or not importable ({exc}); "
                             "install it with `pip install nixl`") from exc
    return _api


def unavailable_reason() -> str | None:
    """None when ``nixl._api`` imports, else why not."""
    try:
        _import_nixl()
    except TransportError as exc:
        return str(exc)
    return None


_AGENT_CONFIG_LOCK = threading.Lock()


def _agent_with_progress_delay(api: Any, name: str, config: Any, delay_us: int) -> Any:
    """``api.nixl_agent(name, config)`` with its progress thread sleeping ``delay_us`` between
    rounds. nixl_agent builds its native ``nixlAgentConfig`` itself and sets ``pthrDelay = 0``;
    for the duration of the call the binding's config class is replaced by a subclass whose
    ``pthrDelay`` setter keeps ``delay_us`` (checked against nixl 1.5: the agent reads the
    config once, in its constructor). Without the native class (another nixl), the agent is
    made as nixl makes it."""
    bind: Any = getattr(api, "nixlBind", None)
    native: Any = getattr(bind, "nixlAgentConfig", None)
    if native is None or not isinstance(getattr(native, "pthrDelay", None), property):
        return api.nixl_agent(name, config)

    class _DelayedConfig(native):  # type: ignore[misc, valid-type]
        @property
        def pthrDelay(self) -> int:  # noqa: N802 - the binding's name
            return int(native.pthrDelay.__get__(self))

        @pthrDelay.setter
        def pthrDelay(self, _ignored: int) -> None:  # noqa: N802
            native.pthrDelay.__set__(self, delay_us)

    with _AGENT_CONFIG_LOCK:
        bind.nixlAgentConfig = _DelayedConfig
        try:
            return api.nixl_agent(name, config)
        finally:
            bind.nixlAgentConfig = native


class NixlTransport(Transport):
    """One-sided READ/WRITE through a NIXL agent."""

    name = "nixl"

    def __init__(self, *, agent_name: str, options: NixlOptions | None = None) -> None:
        self._api = _import_nixl()
        self._opts = options or NixlOptions()
        self._agent_name = agent_name
        self._agent: Any = None
        """Created by register_region, once the memory type (and so the defaults) is known."""
        self._lock = threading.RLock()
        self._table = HandleTable(self._opts.op_timeout_s)
        self._peers: dict[str, _Peer] = {}
        self._local: _Local | None = None
        self._closed = False

    def _create_agent(self, on_gpu: bool) -> Any:
        """The NIXL agent, with the UCX backend tuned for VRAM when the options leave it open.

        NIXL's progress thread stays on: without it transfers stall, on host memory over UCX
        cma and on H200s over cuda_ipc alike (a READ never completed in 300 s). It sleeps
        ``progress_delay_us`` between rounds instead of spinning a core.
        """
        opts = self._opts
        params = dict(opts.ucx_params)
        if on_gpu and not params and opts.num_threads == 0 and opts.num_workers == 0:
            params = dict(GPU_UCX_PARAMS)
        if opts.sgl if opts.sgl is not None else on_gpu:
            # Read by NIXL's UCX plugin; a value the user exported wins.
            os.environ.setdefault(SGL_ENV, "1")
        custom_ucx = (opts.num_workers > 0 or bool(params)) and "UCX" in opts.backends
        config = self._api.nixl_agent_config(
            enable_prog_thread=True,
            backends=[b for b in opts.backends if not (custom_ucx and b == "UCX")],
            num_threads=opts.num_threads)
        agent = _agent_with_progress_delay(self._api, self._agent_name, config,
                                           opts.progress_delay_us)
        if custom_ucx:
            if opts.num_workers > 0:
                params["num_workers"] = str(opts.num_workers)
            if opts.num_threads > 0:
                params["num_threads"] = str(opts.num_threads)
            agent.create_backend("UCX", params)
        return agent

    def register_region(self, tensor: torch.Tensor) -> None:
        """Create the agent and register the KV tensor with every backend for its memory."""
        if self._local is not None:
            raise TransportError("nixl transport: a region is already registered")
        if not tensor.is_contiguous():
            raise TransportError("nixl transport: the KV tensor must be contiguous")
        on_gpu = tensor.device.type == "cuda"
        with self._lock:
            self._agent = self._create_agent(on_gpu)
            reg = self._agent.register_memory(tensor)
        self._local = _Local(tensor, reg, tensor.data_ptr(), tensor.numel() * tensor.element_size(),
                             (tensor.device.index or 0) if on_gpu else 0,
                             "VRAM" if on_gpu else "DRAM")

    def _require_local(self) -> _Local:
        if self._local is None:
            raise TransportError("nixl transport: register_region() must be called first")
        return self._local

    def descriptor(self) -> bytes:
        """msgpack NixlDescriptor (agent metadata + region address, size, device)."""
        local = self._require_local()
        with self._lock:
            metadata = self._agent.get_agent_metadata()
        return msgspec.msgpack.encode(NixlDescriptor(
            transport=self.name, version=DESCRIPTOR_VERSION, agent_name=self._agent_name,
            metadata=bytes(metadata), base_addr=local.base_addr, region_bytes=local.nbytes,
            device_id=local.device_id, mem_type=local.mem_type))

    def add_peer(self, peer_name: str, descriptor: bytes) -> None:
        """Load the peer agent's metadata; a changed descriptor replaces the old one."""
        self._require_local()
        try:
            desc = msgspec.msgpack.decode(descriptor, type=NixlDescriptor)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise TransportError(f"peer {peer_name!r}: not a nixl descriptor ({exc})") from exc
        if desc.transport != self.name or desc.version != DESCRIPTOR_VERSION:
            raise TransportError(f"peer {peer_name!r} sent a {desc.transport} "
                                 f"v{desc.version} descriptor, expected nixl "
                                 f"v{DESCRIPTOR_VERSION}")
        with self._lock:
            old = self._peers.get(peer_name)
            if old is not None and old.desc == desc:
                return
            if old is not None:
                self._forget_peer(peer_name, old, "re-registered")
            remote = self._agent.add_remote_agent(desc.metadata)
            name = remote.decode() if isinstance(remote, bytes) else str(remote)
            self._peers[peer_name] = _Peer(name, desc)

    def _forget_peer(self, peer_name: str, peer: _Peer, why: str) -> None:
        """Fail the peer's batches and unload its metadata (lock held)."""
        for handle in self._table.fail_peer(peer_name, f"peer {peer_name!r} {why}"):
            state = self._table.get(handle)
            self._release_xfer(state.context)
            state.context = None
        try:
            self._agent.remove_remote_agent(peer.remote_name)
        except Exception as exc:  # already disconnected: nothing left to undo
            logger.debug("nixl remove_remote_agent(%s): %s", peer.remote_name, exc)

    def remove_peer(self, peer_name: str) -> None:
        """Forget a peer; its pending batches fail."""
        with self._lock:
            peer = self._peers.pop(peer_name, None)
            if peer is not None:
                self._forget_peer(peer_name, peer, "removed")
            else:
                self._table.fail_peer(peer_name, f"peer {peer_name!r} removed")

    def post(self, op: TransferOp, peer_name: str, segments: Batch) -> int:
        """Create and start one NIXL transfer request for the merged batch."""
        local = self._require_local()
        merged = merge_array(segments)
        with self._lock:
            peer = self._peers.get(peer_name)
            handle, start = open_batch(self._table, self.name, peer_name, merged, local.nbytes,
                                       None if peer is None else peer.desc.region_bytes)
            if not start or peer is None:
                return handle
            try:
                self._start(handle, op, local, peer, merged)
            except Exception as exc:  # NIXL raises its own types (disconnect, bad args)
                self._table.finish(handle, f"nixl {op.value} to peer {peer_name!r} failed "
                                           f"to start: {type(exc).__name__}: {exc}")
        return handle

    def _start(self, handle: int, op: TransferOp, local: _Local, peer: _Peer,
               merged: np.ndarray) -> None:
        """initialize_xfer + transfer for each part of the batch (lock held)."""
        xfers: list[Any] = []
        self._table.get(handle).context = xfers
        states = []
        for part in split_runs(merged, self._opts.split):
            lo = _xfer_rows(local.base_addr, part[:, 0], part[:, 2], local.device_id)
            ro = _xfer_rows(peer.desc.base_addr, part[:, 1], part[:, 2], peer.desc.device_id)
            local_descs = self._agent.get_xfer_descs(lo, local.mem_type)
            remote_descs = self._agent.get_xfer_descs(ro, peer.desc.mem_type)
            xfers.append(self._agent.initialize_xfer(op.value.upper(), local_descs,
                                                     remote_descs, peer.remote_name))
            states.append(self._agent.transfer(xfers[-1]))
        self._apply_states(handle, states)

    def _apply_states(self, handle: int, states: list[str]) -> None:
        """Map NIXL's DONE / PROC / ERR of every part onto the handle."""
        if "ERR" in states:
            peer = self._table.get(handle).peer_name
            self._table.finish(handle, f"nixl transfer to peer {peer!r} reported ERR")
        elif all(state == "DONE" for state in states):
            self._table.finish(handle)

    def poll(self, handle: int) -> TransferStatus:
        """Ask NIXL about a pending batch; PENDING, DONE or FAILED."""
        with self._lock:
            state = self._table.get(handle)
            if state.status is TransferStatus.PENDING and state.context is not None:
                try:
                    self._apply_states(handle, [self._agent.check_xfer_state(xfer)
                                                for xfer in state.context])
                except Exception as exc:
                    self._table.finish(handle, f"nixl transfer to peer {state.peer_name!r} "
                                               f"failed: {type(exc).__name__}: {exc}")
        return self._table.status(handle)

    def error(self, handle: int) -> str | None:
        """Why a FAILED handle failed."""
        return self._table.error(handle)

    def release(self, handle: int) -> None:
        """Forget a handle and free NIXL's request (NIXL cancels it if still active)."""
        state = self._table.pop(handle)
        if state is not None:
            with self._lock:
                self._release_xfer(state.context)

    def _release_xfer(self, xfers: list[Any] | None) -> None:
        for xfer in xfers or ():
            try:
                self._agent.release_xfer_handle(xfer)
            except Exception as exc:  # an uncancellable request: NIXL keeps it on its leak list
                logger.warning("nixl could not release a transfer request: %s", exc)

    def close(self) -> None:
        """Fail pending batches, free requests, unload peers, deregister memory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._table.fail_all("nixl transport closed")
            for _, state in self._table.states():
                self._release_xfer(state.context)
                state.context = None
            for name, peer in list(self._peers.items()):
                self._forget_peer(name, peer, "closed")
            self._peers.clear()
            if self._local is not None:
                try:
                    self._agent.deregister_memory(self._local.reg_descs)
                except Exception as exc:
                    logger.debug("nixl deregister_memory: %s", exc)


def _xfer_rows(base: int, offsets: np.ndarray, lengths: np.ndarray, device: int) -> np.ndarray:
    """NIXL's Nx3 uint64 (address, length, device id) descriptor rows."""
    return np.column_stack((offsets + base, lengths, np.full_like(lengths, device))).astype(
        np.uint64)


def make_nixl_transport(agent_name: str, host: str, **options: Any) -> NixlTransport:
    """Build a NixlTransport (``host`` is unused: UCX picks its own addresses)."""
    if "backends" in options:
        options["backends"] = tuple(options["backends"])
    return NixlTransport(agent_name=agent_name,
                         options=build_options(NixlOptions, "nixl", options))
