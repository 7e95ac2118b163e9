"""KV transports: one interface (``base.Transport``), four implementations, one factory.

==========  =================================================================================
``tcp``     the project's own, no native deps (``tcp.py``); GPU memory staged through pinned
            host buffers
``nixl``    NVIDIA NIXL over UCX (``nixl.py``); host or GPU memory
``ipc``     same-host GPU peer copies through CUDA/HIP IPC handles (``ipc.py``)
``mori``    AMD MoRI-IO ``IOEngine``, RDMA or XGMI backend (``mori.py``; the CPU tests'
            fake_mori.py mirrors its API)
==========  =================================================================================
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from connectors.transports.base import (
    Segment,
    TransferOp,
    TransferStatus,
    Transport,
    TransportError,
    merge_segments,
)

__all__ = [
    "Segment",
    "TransferOp",
    "TransferStatus",
    "Transport",
    "TransportError",
    "available_transports",
    "make_transport",
    "merge_segments",
    "transport_names",
]

# name -> (module, factory function); modules are imported only when asked for, so a missing
# native library never breaks the others.
_FACTORIES: dict[str, tuple[str, str]] = {
    "tcp": ("connectors.transports.tcp", "make_tcp_transport"),
    "nixl": ("connectors.transports.nixl", "make_nixl_transport"),
    "ipc": ("connectors.transports.ipc", "make_ipc_transport"),
    "mori": ("connectors.transports.mori", "make_mori_transport"),
}

_PROBES: dict[str, tuple[str, str]] = {
    name: (module, "unavailable_reason") for name, (module, _) in _FACTORIES.items()
}


def transport_names() -> list[str]:
    """Every transport name ``make_transport`` knows."""
    return list(_FACTORIES)


def make_transport(name: str, *, agent_name: str, host: str = "127.0.0.1",
                   **options: Any) -> Transport:
    """Create a transport by name; ``options`` are that transport's keyword options."""
    if name not in _FACTORIES:
        raise TransportError(f"unknown KV transport {name!r}; choose one of "
                             f"{', '.join(_FACTORIES)}")
    module_name, factory_name = _FACTORIES[name]
    factory: Callable[..., Transport] = getattr(importlib.import_module(module_name),
                                                factory_name)
    return factory(agent_name, host, **options)


def available_transports() -> dict[str, str | None]:
    """name -> None if usable on this machine, else the reason why not (``disagg doctor``)."""
    result: dict[str, str | None] = {}
    for name, (module_name, probe_name) in _PROBES.items():
        try:
            probe: Callable[[], str | None] = getattr(importlib.import_module(module_name),
                                                      probe_name)
            result[name] = probe()
        except Exception as exc:  # a broken install must show up as a reason, not a crash
            result[name] = f"cannot load {module_name}: {type(exc).__name__}: {exc}"
    return result
