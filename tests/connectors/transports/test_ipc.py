"""ipc transport: GPU peer copies through CUDA/HIP IPC handles (GPU machines only)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transport_harness import PeerProcess, check_read, check_write, wait_done

from connectors.transports import (
    Segment,
    TransferOp,
    Transport,
    TransportError,
    available_transports,
    make_transport,
)
from connectors.transports.ipc import IpcOptions

MakeLocal = Callable[..., Transport]
SpawnPeer = Callable[..., PeerProcess]


def test_unavailable_on_cpu_says_why() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    reason = available_transports()["ipc"]
    assert reason is not None and "GPU" in reason
    with pytest.raises(TransportError, match="GPU"):
        make_transport("ipc", agent_name="x")


# The batches mix whole blocks (64-byte aligned: the copy kernel) with odd pieces (copy_).
COPY_OPTIONS = [{"copy": "runtime"}, {"copy": "kernel"}, {"copy": "torch"}]


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="copy='dma'"):
        IpcOptions(copy="dma")


@pytest.mark.multi_gpu
@pytest.mark.parametrize("options", COPY_OPTIONS, ids=lambda o: "-".join(o.values()))
def test_read_and_write_between_two_gpus(make_local: MakeLocal, spawn_peer: SpawnPeer,
                                         options: dict[str, str]) -> None:
    """Peer process on cuda:1, this process on cuda:0: NVLink / xGMI peer copies."""
    peer = spawn_peer("ipc", device="cuda:1")
    check_read(make_local("ipc", **options), peer, device="cuda:0")
    check_write(make_local("ipc", **options), peer, peer_fill="pattern1", device="cuda:0")


@pytest.mark.gpu
@pytest.mark.parametrize("options", COPY_OPTIONS, ids=lambda o: "-".join(o.values()))
def test_read_and_write_on_one_gpu(make_local: MakeLocal, spawn_peer: SpawnPeer,
                                   options: dict[str, str]) -> None:
    """Two processes sharing one GPU (the IPC path inside a device)."""
    peer = spawn_peer("ipc", device="cuda:0")
    check_read(make_local("ipc", **options), peer, device="cuda:0")
    check_write(make_local("ipc", **options), peer, peer_fill="pattern1", device="cuda:0")


@pytest.mark.gpu
def test_in_process_errors(make_local: MakeLocal) -> None:
    a = make_local("ipc")
    with pytest.raises(TransportError, match="needs a GPU tensor"):
        a.register_region(torch.zeros(16, dtype=torch.uint8))
    a.register_region(torch.zeros(4096, dtype=torch.uint8, device="cuda:0"))
    with pytest.raises(TransportError, match="not an ipc descriptor"):
        a.add_peer("junk", b"junk")
    status, error = wait_done(a, a.post(TransferOp.READ, "ghost", [Segment(0, 0, 1)]))
    assert status == "failed" and "unknown peer" in (error or "")
