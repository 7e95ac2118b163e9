"""Fixtures for transport tests: transports closed and peer processes reaped at teardown."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The peer processes import ``transport_harness`` by name (spawn pickles functions by module),
# so this folder must be importable whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transport_harness import PeerProcess  # noqa: E402

from connectors.transports import Transport, make_transport  # noqa: E402


@pytest.fixture
def make_local() -> Iterator[Callable[..., Transport]]:
    """Factory for in-process transports; every one is closed after the test."""
    made: list[Transport] = []

    def factory(name: str, **options: Any) -> Transport:
        transport = make_transport(name, agent_name=f"local-{len(made)}", **options)
        made.append(transport)
        return transport

    yield factory
    for transport in made:
        transport.close()


@pytest.fixture
def spawn_peer() -> Iterator[Callable[..., PeerProcess]]:
    """Factory for peer processes; every one is stopped (or killed) after the test."""
    peers: list[PeerProcess] = []

    def factory(name: str, **kwargs: Any) -> PeerProcess:
        peer = PeerProcess(name, kwargs.pop("nbytes", 1 << 20), **kwargs)
        peers.append(peer)
        return peer

    yield factory
    for peer in peers:
        peer.close()
