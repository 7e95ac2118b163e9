"""Byte ranges of a registered region to and from a socket, for the tcp transport.

Host (CPU) regions are read and written in place through a memoryview of the tensor's storage
(``sendmsg`` / ``recvmsg_into`` straight from/to it: zero copies in Python).

GPU regions cannot be handed to a socket, so they are staged through two pinned host buffers,
double-buffered so the PCIe copy of one piece overlaps the network I/O of the other::

    send:  GPU --copy(stream)--> pinned[0] --sendmsg-->        (meanwhile GPU -> pinned[1])
    recv:  --recvmsg_into--> pinned[0] --copy(stream)--> GPU   (meanwhile recv into pinned[1])

The staged path works on any device, so CPU tests exercise its chunking on a CPU tensor.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from connectors.transports.tcp_wire import recv_into_views, send_views

Range = tuple[int, int]
"""(offset, length) in bytes inside a region."""


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (no copy); it must be contiguous."""
    if not tensor.is_contiguous():
        raise ValueError("the registered KV tensor must be contiguous")
    return tensor.detach().reshape(-1).view(torch.uint8)


class HostRegionIO:
    """Zero-copy socket I/O on a CPU tensor; shareable between threads."""

    def __init__(self, region: torch.Tensor) -> None:
        self._view = byte_view(region).numpy().data

    def send_ranges(self, sock: socket.socket, ranges: Sequence[Range],
                    ready_event: Any = None) -> None:
        """Send the bytes of ``ranges`` in order."""
        send_views(sock, [self._view[o:o + n] for o, n in ranges])

    def recv_ranges(self, sock: socket.socket, ranges: Sequence[Range],
                    ready_event: Any = None) -> None:
        """Receive bytes into ``ranges`` in order."""
        recv_into_views(sock, [self._view[o:o + n] for o, n in ranges])


class _CopyStream:
    """A side stream + events on GPUs; plain synchronous copies on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """Make the side stream current for the copies issued inside."""
        if self.stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.stream)

    def record(self) -> Any:
        """An event marking the copies issued so far (None on CPU: they already ran)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def wait_on(self, event: Any) -> None:
        """Order later side-stream copies after ``event`` (e.g. the engine's compute)."""
        if event is not None and self.stream is not None:
            self.stream.wait_event(event)


def _synchronize(event: Any) -> None:
    """Block until the copies behind ``event`` finished (no-op on CPU)."""
    if event is not None:
        event.synchronize()


def plan_fills(ranges: Sequence[Range], fill_bytes: int) -> Iterator[list[Range]]:
    """Cut ``ranges`` into consecutive groups of at most ``fill_bytes`` bytes each."""
    fill: list[Range] = []
    room = fill_bytes
    for offset, length in ranges:
        while length > 0:
            step = min(length, room)
            fill.append((offset, step))
            offset, length, room = offset + step, length - step, room - step
            if room == 0:
                yield fill
                fill, room = [], fill_bytes
    if fill:
        yield fill


class StagedRegionIO:
    """Socket I/O on a device tensor through two host staging buffers; one per connection."""

    def __init__(self, region: torch.Tensor, staging_bytes: int) -> None:
        self._region = byte_view(region)
        self._half_bytes = max(1, staging_bytes // 2)
        self._copies = _CopyStream(region.device)
        pin = region.device.type == "cuda"
        self._bufs = [torch.empty(self._half_bytes, dtype=torch.uint8, pin_memory=pin)
                      for _ in range(2)]
        self._views = [b.numpy().data for b in self._bufs]

    def _stage_out(self, slot: int, fill: list[Range]) -> Any:
        """Queue region -> staging copies of one fill; returns their event."""
        buf, pos = self._bufs[slot], 0
        with self._copies.context():
            for offset, length in fill:
                buf[pos:pos + length].copy_(self._region[offset:offset + length],
                                            non_blocking=True)
                pos += length
            return self._copies.record()

    def _stage_in(self, slot: int, fill: list[Range]) -> Any:
        """Queue staging -> region copies of one fill; returns their event."""
        buf, pos = self._bufs[slot], 0
        with self._copies.context():
            for offset, length in fill:
                self._region[offset:offset + length].copy_(buf[pos:pos + length],
                                                           non_blocking=True)
                pos += length
            return self._copies.record()

    def send_ranges(self, sock: socket.socket, ranges: Sequence[Range],
                    ready_event: Any = None) -> None:
        """Send the bytes of ``ranges``; copies wait for ``ready_event`` (engine compute)."""
        self._copies.wait_on(ready_event)
        fills = list(plan_fills(ranges, self._half_bytes))
        if not fills:
            return
        event = self._stage_out(0, fills[0])
        for i, fill in enumerate(fills):
            # The other slot was sent (synchronously) last iteration: safe to refill now.
            next_event = self._stage_out((i + 1) % 2, fills[i + 1]) if i + 1 < len(fills) \
                else None
            _synchronize(event)
            size = sum(n for _, n in fill)
            send_views(sock, [self._views[i % 2][:size]])
            event = next_event

    def recv_ranges(self, sock: socket.socket, ranges: Sequence[Range],
                    ready_event: Any = None) -> None:
        """Receive into ``ranges``; returns once the bytes are in the region.

        Uploads wait for ``ready_event`` so earlier engine work on those blocks finishes first.
        """
        self._copies.wait_on(ready_event)
        pending: list[Any] = [None, None]
        for i, fill in enumerate(plan_fills(ranges, self._half_bytes)):
            slot = i % 2
            _synchronize(pending[slot])  # that slot's previous upload must be done
            size = sum(n for _, n in fill)
            recv_into_views(sock, [self._views[slot][:size]])
            pending[slot] = self._stage_in(slot, fill)
        for event in pending:
            _synchronize(event)


RegionIO = HostRegionIO | StagedRegionIO


class Region:
    """A registered tensor plus how connections should do I/O on it."""

    def __init__(self, tensor: torch.Tensor, staging_bytes: int,
                 force_staging: bool = False) -> None:
        self.tensor = tensor
        self.nbytes = tensor.numel() * tensor.element_size()
        self.device = tensor.device
        self._staged = force_staging or tensor.device.type != "cpu"
        self._staging_bytes = staging_bytes
        self._host_io = None if self._staged else HostRegionIO(tensor)

    @property
    def staged(self) -> bool:
        """True when bytes go through pinned staging buffers (GPU memory)."""
        return self._staged

    def io_for_connection(self) -> RegionIO:
        """I/O object for one connection (staged regions need private buffers)."""
        if self._host_io is not None:
            return self._host_io
        return StagedRegionIO(self.tensor, self._staging_bytes)

    def check(self, offsets: Sequence[int], lengths: Sequence[int]) -> str | None:
        """Why these ranges are not inside the region, or None when they all are."""
        if len(offsets) != len(lengths):
            return f"{len(offsets)} offsets but {len(lengths)} lengths"
        for offset, length in zip(offsets, lengths, strict=True):
            if offset < 0 or length < 0 or offset + length > self.nbytes:
                return (f"range [{offset}, {offset + length}) is outside the "
                        f"{self.nbytes}-byte region")
        return None
