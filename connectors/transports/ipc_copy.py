"""How the ipc transport copies one batch of byte runs between two GPU regions (option ``copy``).

Numbers: 512 MiB as 256 scattered 2 MiB blocks between 2x H200 (NVLink), as a share of one
contiguous peer copy of the same bytes (~390 GB/s); "in one process" is
``bench/peer_copy_probe.py``, "through the transport" is ``bench/transfer_gpu.sh`` between two
processes (IPC-mapped memory, host time of ``post`` included).

- ``batch`` (what ``auto`` picks where the CUDA driver has ``cuMemcpyBatchAsync``, 12.8+): the
  copy engines, one batched call per stream for up to ``streams`` streams (a batch takes one
  more stream per ``stream_min_bytes``), issued on the local GPU by default (``issue_on``).
  In one process 90-93 % with 4-8 streams (1 stream 72 %); through the transport 60-79 %:
  issuing costs the host 0.5-0.7 ms per 256 copies from the local GPU, 1.2 ms from the peer's.
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

A path that fails at run time is logged and replaced for good (batch -> kernel -> runtime);
the failed batch is re-issued the new way, so a post never fails for it. The copies of a batch
run concurrently and in no set order (segments never overlap on the destination).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from connectors.transports.base import TransportError, split_runs
from connectors.transports.gpu_runtime import BatchMemcpy, RuntimeMemcpy

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

    def issue(self, src: torch.Tensor, dst: torch.Tensor, merged: np.ndarray, *,
              src_is_local: bool) -> torch.cuda.Event:
        """Copy every (local, remote, length) row of ``merged`` from ``src`` to ``dst`` after
        the caller's current stream on the local device; returns the completion event
        (recorded on a local stream). ``src_is_local`` says which offset is the source's."""
        local, remote = (src, dst) if src_is_local else (dst, src)
        local_stream = self.stream(local.device.index or 0)
        # Run after whatever the caller queued on its stream (the KV it just computed).
        local_stream.wait_stream(torch.cuda.current_stream(local.device))
        runs = merged if src_is_local else merged[:, [1, 0, 2]]
        used: list[torch.cuda.Stream] = []
        if ((self.mode == "batch" and self._batch is not None)
                or (self.mode == "runtime" and self._memcpy is not None)):
            engine = {"local": local, "source": src, "destination": dst}[self._issue_on].device
            used = self._copy_on_streams(
                src, dst, split_runs(runs, self._num_streams, self._stream_min_bytes), engine,
                local_stream)
        if not used:
            used = [self._copy_on_peer(src, dst, [(int(s), int(d), int(n)) for s, d, n in runs],
                                       local_stream, self.stream(remote.device.index or 0))]
        for stream in used:
            local_stream.wait_stream(stream)
        event = torch.cuda.Event()
        event.record(local_stream)
        return event

    def _copy_on_streams(self, src: torch.Tensor, dst: torch.Tensor, parts: list[np.ndarray],
                         engine: torch.device,
                         after: torch.cuda.Stream) -> list[torch.cuda.Stream]:
        """``batch`` / ``runtime``: one copy stream of ``engine`` per part, each after
        ``after``. Returns the streams used, or [] once a batched call failed (``batch`` is
        then off for good)."""
        index = engine.index or 0
        ready = torch.cuda.Event()
        ready.record(after)
        streams = [self.stream(index, k + 1) for k in range(len(parts))]
        src_ptr, dst_ptr = src.data_ptr(), dst.data_ptr()
        with torch.cuda.device(engine):
            for k, (stream, part) in enumerate(zip(streams, parts)):
                stream.wait_event(ready)
                if self.mode == "runtime":
                    assert self._memcpy is not None
                    for s, d, n in part.tolist():
                        self._memcpy.copy(dst_ptr + d, src_ptr + s, n, stream.cuda_stream)
                    continue
                assert self._batch is not None
                try:
                    self._batch.copy(part[:, 1] + dst_ptr, part[:, 0] + src_ptr, part[:, 2],
                                     stream.cuda_stream, src_device=src.device.index or 0,
                                     dst_device=dst.device.index or 0)
                except RuntimeError as exc:
                    logger.warning("ipc batched memcpy failed (%s); using the copy kernel from "
                                   "now on", exc)
                    self.mode = "kernel"
                    for issued in streams[:k]:  # the batch's event must cover them too
                        after.wait_stream(issued)
                    return []
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
