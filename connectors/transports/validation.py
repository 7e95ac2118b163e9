"""Checks shared by every transport: segment bounds and keyword options."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from connectors.transports.base import Segment, TransportError
from connectors.transports.handles import HandleTable
from disagg.common.config import ConfigError

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


class OptionError(TransportError, ConfigError):
    """A transport option the user gave is unknown or unusable: a configuration error (an
    instance refuses to start with one line naming it)."""


_SCALARS: dict[str, Any] = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _check_option(transport: str, name: str, annotation: str, value: Any) -> None:
    """The value fits the field's simple annotation (``int``, ``float | None``, ...); others
    (tuples, mappings) are the transport's to check. Timeouts and other floats are finite
    and positive, a ``port`` is 0 to 65535."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    scalar = [k for k in kinds if k in _SCALARS]
    if not scalar or len(scalar) != len([k for k in kinds if k != "None"]):
        return
    ok = any(isinstance(value, _SCALARS[k]) and not (k != "bool" and isinstance(value, bool))
             for k in scalar)
    if not ok:
        raise OptionError(f"{transport} transport option {name} must be "
                          f"{' or '.join(kinds)}, got {value!r}")
    if "float" in scalar and not (math.isfinite(value) and value > 0):
        raise OptionError(f"{transport} transport option {name} must be a positive number of "
                          f"seconds (or bytes), got {value!r}")
    if name == "port" and not 0 <= value <= 65535:
        raise OptionError(f"{transport} transport option port must be 0 to 65535, got {value}")


def build_options(cls: type[T], transport: str, options: dict[str, Any]) -> T:
    """Instantiate an options dataclass, naming unknown keys and values of the wrong type in
    a clear error (OptionError)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise OptionError(f"unknown {transport} transport option(s) {unknown}; "
                          f"known: {sorted(fields)}")
    for name, value in options.items():
        annotation = fields[name].type
        if isinstance(annotation, str):
            _check_option(transport, name, annotation, value)
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:  # a transport's own __post_init__ check
        raise OptionError(f"{transport} transport options: {exc}") from None


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
