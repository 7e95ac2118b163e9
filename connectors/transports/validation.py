"""Checks shared by every transport: segment bounds and keyword options."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from connectors.transports.base import Segment, TransportError
from connectors.transports.handles import HandleTable

T = TypeVar("T")


def check_segments(segments: Sequence[Segment], local_bytes: int,
                   remote_bytes: int) -> str | None:
    """Why a batch does not fit both regions, or None when every segment does."""
    for seg in segments:
        if seg.length < 0 or seg.local_offset < 0 or seg.remote_offset < 0:
            return f"negative offset or length in {seg}"
        if seg.local_offset + seg.length > local_bytes:
            return f"{seg} runs past the local region ({local_bytes} bytes)"
        if seg.remote_offset + seg.length > remote_bytes:
            return f"{seg} runs past the peer's region ({remote_bytes} bytes)"
    return None


def check_array(runs: np.ndarray, local_bytes: int, remote_bytes: int) -> str | None:
    """``check_segments`` for [n, 3] (local, remote, length) rows: the same answer, found
    without a Python loop over the rows."""
    bad = ((runs < 0).any(axis=1) | (runs[:, 0] + runs[:, 2] > local_bytes)
           | (runs[:, 1] + runs[:, 2] > remote_bytes))
    if not bad.any():
        return None
    first = Segment(*runs[int(bad.argmax())].tolist())
    return check_segments([first], local_bytes, remote_bytes)


def build_options(cls: type[T], transport: str, options: dict[str, Any]) -> T:
    """Instantiate an options dataclass, naming unknown keys in a clear error."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise TransportError(f"unknown {transport} transport option(s) {unknown}; "
                             f"known: {sorted(known)}")
    return cls(**options)


def open_batch(table: HandleTable, transport: str, peer_name: str,
               merged: Sequence[Segment] | np.ndarray, local_bytes: int,
               remote_bytes: int | None) -> tuple[int, bool]:
    """The handle of a new batch, and whether the transport must start it.

    ``merged`` is a list of segments or ``merge_array``'s rows. ``remote_bytes`` None means
    the peer is unknown: the handle is already FAILED. An empty batch is already DONE.
    Segments outside either region raise ValueError (a caller bug).
    """
    handle = table.new(peer_name)
    if remote_bytes is None:
        table.finish(handle, f"unknown peer {peer_name!r} (add_peer first)")
        return handle, False
    problem = (check_array(merged, local_bytes, remote_bytes) if isinstance(merged, np.ndarray)
               else check_segments(merged, local_bytes, remote_bytes))
    if problem is not None:
        table.pop(handle)
        raise ValueError(f"{transport} transport post to {peer_name!r}: {problem}")
    if not len(merged):
        table.finish(handle)
        return handle, False
    return handle, True
