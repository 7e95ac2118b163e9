"""How the ipc transport copies one batch of byte runs between two GPU regions (option ``copy``).

Numbers: 512 MiB as 256 scattered 2 MiB blocks between 2x H200 (NVLink), as a share of one
contiguous peer copy of the same bytes (~390 GB/s); "in one process" is
``bench/peer_copy_probe.py``, "through the transport" is ``bench/transfer_gpu.sh`` between two
processes (IPC-mapped memory, host time of ``post`` included).

- ``batch`` (what ``auto`` picks where the CUDA driver has ``cuMemcpyBatchAsync``, 12.8+): the
  copy engines, one batched call per stream for up to ``streams`` streams (a batch takes one
  more stream per ``stream_min_bytes``), issued on the local GPU by default (``issue_on``).
  In one process 90-97 % with 4-8 streams (1 stream 72-88 %); through the transport p50
  78-87 % over three sessions (latest: read 86.9-87.3 %, write 84.0-87.2 %).
  ``python -m bench.ipc_profile`` times both sides: once the first call returns, the copy
  engines move the rest at ~98 % of a contiguous copy;
  what is lost is host time before the first copy (~0.2 ms: merging, bounds-checking and
  addressing the 256 rows in numpy, ~3x slower on that host than on a desktop core) and
  noticing the end. Splitting the streams' calls into doubling slices, so that every stream
  starts after one copy, made it worse (48 calls instead of 8: 53-68 %); issuing from the
  peer's GPU costs ~1.2 ms per 256 copies instead of ~0.4.
- ``kernel`` (what ``auto`` picks elsewhere, e.g. ROCm): one Triton ``copy_segments`` launch
  for the 64-byte-aligned runs, run on the PEER's GPU, the one context in which Triton accepts
  the IPC-mapped pointer (it pushes a READ, pulls a WRITE). 78-80 % in one process, 47-68 %
  through the transport. Unaligned runs, and every run if the kernel cannot launch, take the
  ``runtime`` path.
- ``runtime``: one ``cudaMemcpyAsync`` / ``hipMemcpyAsync`` per run, through ctypes on the
  runtime library torch has loaded. Each peer copy costs the copy engine ~10 us of setup:
  70 % pushing from the source GPU and 40 % pulling in one process, 34-53 % through the
  transport.
- ``torch``: one ``copy_`` per run (the portable fallback, also when no runtime library is
  found); its cross-device stream handshakes cost ~20 us a run: 20-31 %.

Rows that step evenly (one layer's slice of runs of consecutive blocks, what a layerwise
WRITE posts after each layer) go, in ``batch`` and ``runtime`` mode, as one runtime 2D copy
(``cudaMemcpy2DAsync`` / ``hipMemcpy2DAsync``) per run instead of one copy per block: on an
H200 the per-copy host cost (~5 us in ``cuMemcpyBatchAsync``) of 8,000 64 KiB copies per 4k
prompt had left the GPU waiting on the forward's host thread (``base.strided_runs``).

A path that fails at run time is logged and replaced for good (batch -> kernel -> runtime);
the failed batch is re-issued the new way, so a post never fails for it. The copies of a batch
run concurrently and in no set order (segments never overlap on the destination).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from connectors.transports.base import TransportError, split_bounds, strided_runs
from connectors.transports.gpu_runtime import BatchMemcpy, BatchRows, RuntimeMemcpy

logger = logging.getLogger(__name__)

COPY_MODES = ("auto", "batch", "kernel", "runtime", "torch")
ISSUE_SIDES = ("local", "source", "destination")
STREAM_MIN_BYTES = 32 << 20
"""Default: a batch is spread over one more copy stream for each this many bytes (up to
``streams``): small per-layer batches stay on one stream, 512 MiB uses all of them."""
Run = tuple[int, int, int]
"""(source offset, destination offset, bytes)."""


class PeerCopier:
    """Issues batches of copies between two GPU regions on dedicated streams."""

    def __init__(self, copy: str, streams: int, stream_min_bytes: int = STREAM_MIN_BYTES, *,
                 issue_on: str = "local") -> None:
        self._streams: dict[int, list[torch.cuda.Stream]] = {}
        self._events: dict[tuple[int, int], torch.cuda.Event] = {}
        self._issue_on = issue_on
        self._num_streams = streams
        self._stream_min_bytes = stream_min_bytes
        self._batch: BatchMemcpy | None = None
        if copy in ("auto", "batch"):
            try:
                self._batch = BatchMemcpy()
            except (TransportError, OSError, AttributeError) as exc:
                if copy == "batch":
                    logger.warning("ipc: batched memcpy unavailable (%s); using the kernel", exc)
            copy = "batch" if self._batch is not None else "kernel"
        self.mode = copy
        """The path in use: ``auto`` resolved, and after a fallback the fallback."""
        self._strided = True
        """Evenly stepping rows go as runtime 2D copies (off for good after one failed)."""
        self._memcpy: RuntimeMemcpy | None = None
        if copy != "torch":  # the kernel's leftovers take the runtime path too
            try:
                self._memcpy = RuntimeMemcpy()
            except (TransportError, OSError, AttributeError) as exc:
                logger.warning("ipc: runtime memcpy unavailable (%s); using torch copy_", exc)

    def stream(self, index: int, k: int = 0) -> torch.cuda.Stream:
        """Dedicated copy stream ``k`` of one device (created on first use)."""
        pool = self._streams.setdefault(index, [])
        while len(pool) <= k:
            pool.append(torch.cuda.Stream(torch.device("cuda", index)))
        return pool[k]

    def _event(self, index: int, k: int) -> torch.cuda.Event:
        """Reusable event ``k`` of one device: re-recording it is safe, a wait enqueued
        earlier keeps waiting for the record it saw."""
        event = self._events.get((index, k))
        if event is None:
            event = self._events[(index, k)] = torch.cuda.Event()
        return event

    def issue(self, src: torch.Tensor, dst: torch.Tensor, merged: np.ndarray, *,
              src_is_local: bool) -> torch.cuda.Event:
        """Copy every (local, remote, length) row of ``merged`` from ``src`` to ``dst`` after
        the caller's current stream on the local device; returns the completion event
        (recorded on a local stream). ``src_is_local`` says which offset is the source's."""
        local, remote = (src, dst) if src_is_local else (dst, src)
        local_index = local.device.index or 0
        local_stream = self.stream(local_index)
        caller = torch.cuda.current_stream(local.device)
        if self._strided and self.mode in ("batch", "runtime") and self._memcpy is not None:
            groups = strided_runs(merged)
            if len(groups) < len(merged):
                event = self._issue_strided(src, dst, groups, src_is_local, caller, local_stream)
                if event is not None:
                    return event
        if self.mode == "batch" and self._batch is not None:
            event = self._issue_batch(src, dst, merged, src_is_local, caller, local_stream)
            if event is not None:
                return event
        # Run after whatever the caller queued on its stream (the KV it just computed).
        local_stream.wait_stream(caller)
        runs = merged if src_is_local else merged[:, [1, 0, 2]]
        used: list[torch.cuda.Stream] = []
        if self.mode == "runtime" and self._memcpy is not None:
            used = self._runtime_on_streams(src, dst, runs, local, local_stream)
        if not used:
            used = [self._copy_on_peer(src, dst, [(int(s), int(d), int(n)) for s, d, n in runs],
                                       local_stream, self.stream(remote.device.index or 0))]
        for stream in used:
            local_stream.wait_stream(stream)
        event = torch.cuda.Event()
        event.record(local_stream)
        return event

    def _engine(self, src: torch.Tensor, dst: torch.Tensor, local: torch.Tensor) -> int:
        """The device whose copy engines run ``batch`` / ``runtime`` copies (``issue_on``)."""
        tensor = {"local": local, "source": src, "destination": dst}[self._issue_on]
        return tensor.device.index or 0

    def _issue_batch(self, src: torch.Tensor, dst: torch.Tensor, merged: np.ndarray,
                     src_is_local: bool, caller: torch.cuda.Stream,
                     local_stream: torch.cuda.Stream) -> torch.cuda.Event | None:
        """``batch``: byte-balanced groups of rows, one batched call per copy stream, each
        stream starting after ``caller``; returns the completion event, or None once a
        batched call failed (``batch`` is then off for good).

        Host time before the first copy is what the copy engines lose (once started they run
        at ~98 % of a contiguous copy on 2x H200), so each stream's wait, call and done-record
        are issued in turn, with events reused across batches, rather than set up for every
        stream first.
        """
        assert self._batch is not None
        local_index = local_stream.device.index or 0
        engine = self._engine(src, dst, src if src_is_local else dst)
        ready = self._event(local_index, 0)
        ready.record(caller)
        src_col, dst_col = (0, 1) if src_is_local else (1, 0)
        rows = BatchRows(merged[:, dst_col], merged[:, src_col], merged[:, 2],
                         dst_base=dst.data_ptr(), src_base=src.data_ptr(),
                         src_device=src.device.index or 0, dst_device=dst.device.index or 0)
        bounds = split_bounds(merged[:, 2], self._num_streams, self._stream_min_bytes)
        issued: list[torch.cuda.Stream] = []
        with torch.cuda.device(engine):
            for k in range(len(bounds) - 1):
                stream = self.stream(engine, k + 1)
                stream.wait_event(ready)
                try:
                    self._batch.copy_rows(rows, bounds[k], bounds[k + 1], stream.cuda_stream)
                except RuntimeError as exc:
                    logger.warning("ipc batched memcpy failed (%s); using the copy kernel "
                                   "from now on", exc)
                    self.mode = "kernel"
                    for done in issued:  # the fallback's event must cover what did start
                        local_stream.wait_stream(done)
                    return None
                self._event(engine, k + 1).record(stream)
                issued.append(stream)
        return self._after_streams(local_stream, engine, len(issued))

    def _after_streams(self, local_stream: torch.cuda.Stream, engine: int,
                       count: int) -> torch.cuda.Event:
        """The batch's completion event: recorded on ``local_stream`` once it has waited for
        the done-records of the engine's first ``count`` copy streams."""
        for k in range(count):
            local_stream.wait_event(self._event(engine, k + 1))
        event = torch.cuda.Event()
        event.record(local_stream)
        return event

    def _issue_strided(self, src: torch.Tensor, dst: torch.Tensor, groups: np.ndarray,
                       src_is_local: bool, caller: torch.cuda.Stream,
                       local_stream: torch.cuda.Stream) -> torch.cuda.Event | None:
        """Rows that step evenly (one layer of consecutive blocks: a layerwise WRITE's posts)
        as one runtime 2D copy per group, the rest one copy each, spread over the copy streams
        by bytes; returns the completion event, or None once a 2D copy failed (2D is then off
        for good and the caller re-issues the whole batch its own way: copies that did start
        write the same bytes again).

        Measured on an H200 (P and D on one GPU): a 4k-token prompt's layer posts are 8,000
        copies of 64 KiB; ``cuMemcpyBatchAsync`` spends ~5 us of host time on each, ~0.6 ms per
        layer inside the forward, which left the GPU waiting on the host (layerwise WRITE TTFT
        1.4x monolithic). As 2D copies they are a few calls per layer.
        """
        assert self._memcpy is not None
        local_index = local_stream.device.index or 0
        engine = self._engine(src, dst, src if src_is_local else dst)
        ready = self._event(local_index, 0)
        ready.record(caller)
        src_col, dst_col, src_pitch, dst_pitch = (0, 1, 4, 5) if src_is_local else (1, 0, 5, 4)
        bounds = split_bounds(groups[:, 2] * groups[:, 3], self._num_streams,
                              self._stream_min_bytes)
        src_ptr, dst_ptr = src.data_ptr(), dst.data_ptr()
        issued: list[torch.cuda.Stream] = []
        with torch.cuda.device(engine):
            for k in range(len(bounds) - 1):
                stream = self.stream(engine, k + 1)
                stream.wait_event(ready)
                handle = stream.cuda_stream
                try:
                    for g in groups[bounds[k]:bounds[k + 1]].tolist():
                        if g[3] == 1:
                            self._memcpy.copy(dst_ptr + g[dst_col], src_ptr + g[src_col], g[2],
                                              handle)
                        else:
                            self._memcpy.copy_2d(dst_ptr + g[dst_col], g[dst_pitch],
                                                 src_ptr + g[src_col], g[src_pitch], g[2], g[3],
                                                 handle)
                except RuntimeError as exc:
                    logger.warning("ipc 2D memcpy failed (%s); copying row by row from now on",
                                   exc)
                    self._strided = False
                    for done in [*issued, stream]:  # the fallback's event covers what started
                        local_stream.wait_stream(done)
                    return None
                self._event(engine, k + 1).record(stream)
                issued.append(stream)
        return self._after_streams(local_stream, engine, len(issued))

    def _runtime_on_streams(self, src: torch.Tensor, dst: torch.Tensor, runs: np.ndarray,
                            local: torch.Tensor,
                            after: torch.cuda.Stream) -> list[torch.cuda.Stream]:
        """``runtime``: one runtime memcpy per (source, destination, length) row, the rows
        spread over the engine's copy streams, each stream after ``after``."""
        assert self._memcpy is not None
        engine = self._engine(src, dst, local)
        bounds = split_bounds(runs[:, 2], self._num_streams, self._stream_min_bytes)
        streams = [self.stream(engine, k + 1) for k in range(len(bounds) - 1)]
        src_ptr, dst_ptr = src.data_ptr(), dst.data_ptr()
        with torch.cuda.device(engine):
            for k, stream in enumerate(streams):
                stream.wait_stream(after)
                for s, d, n in runs[bounds[k]:bounds[k + 1]].tolist():
                    self._memcpy.copy(dst_ptr + d, src_ptr + s, n, stream.cuda_stream)
        return streams

    def _copy_on_peer(self, src: torch.Tensor, dst: torch.Tensor, runs: list[Run],
                      local_stream: torch.cuda.Stream,
                      remote_stream: torch.cuda.Stream) -> torch.cuda.Stream:
        """``kernel`` / ``torch`` (and the kernel's leftovers); returns the stream to wait on."""
        remote_stream.wait_stream(local_stream)
        leftover = self._copy_kernel(src, dst, runs, remote_stream)
        if leftover and self._memcpy is not None:
            with torch.cuda.device(local_stream.device):
                handle = local_stream.cuda_stream
                for s, d, n in leftover:
                    self._memcpy.copy(dst.data_ptr() + d, src.data_ptr() + s, n, handle)
        elif leftover:
            # Cross-device copy_ runs on the source device's current stream and makes the
            # destination's current stream wait: making both ours current keeps it off the
            # engine's streams and leaves local_stream after every copy.
            with torch.cuda.stream(remote_stream), torch.cuda.stream(local_stream):
                for s, d, n in leftover:
                    dst[d:d + n].copy_(src[s:s + n], non_blocking=True)
        return remote_stream

    def _copy_kernel(self, src: torch.Tensor, dst: torch.Tensor, runs: list[Run],
                     remote_stream: torch.cuda.Stream) -> list[Run]:
        """One copy_segments launch for the 64-byte-aligned runs; returns the runs left over.

        It runs on the peer's GPU and stream: Triton refuses an IPC-mapped pointer in any other
        device's context ("cannot be accessed from Triton"), while our own allocation is
        reachable from the peer's context once peer access is on.
        """
        from hip_kernels.kv_blocks import copy_segments, segments_aligned
        from hip_kernels.triton_compat import HAS_TRITON

        if self.mode != "kernel" or not HAS_TRITON:
            return runs
        aligned = [run for run in runs if segments_aligned([run])]
        if not aligned:
            return runs
        try:
            with torch.cuda.device(remote_stream.device), torch.cuda.stream(remote_stream):
                copy_segments(src, dst, aligned)
        except Exception as exc:  # Triton launch/compile errors have their own types
            logger.warning("ipc copy kernel unavailable (%s: %s); copying run by run from now "
                           "on", type(exc).__name__, exc)
            self.mode = "runtime"
            return runs
        return [run for run in runs if not segments_aligned([run])]

    def synchronize(self) -> None:
        """Wait for every copy issued so far."""
        for pool in self._streams.values():
            for stream in pool:
                stream.synchronize()

