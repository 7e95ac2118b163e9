"""Checks shared by every transport: segment bounds and keyword options."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

from connectors.transports.base import Segment, TransportError

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


def build_options(cls: type[T], transport: str, options: dict[str, Any]) -> T:
    """Instantiate an options dataclass, naming unknown keys in a clear error."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise TransportError(f"unknown {transport} transport option(s) {unknown}; "
                             f"known: {sorted(known)}")
    return cls(**options)
