"""ipc transport: GPU peer copies through CUDA/HIP IPC handles (GPU machines only)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numpy as np
import pytest
import torch
from transport_harness import PeerProcess, check_read, check_write, layer_segments, wait_done

from connectors.transports import (
    Segment,
    TransferOp,
    Transport,
    TransportError,
    available_transports,
    make_transport,
)
from connectors.transports.base import merge_array, split_bounds, split_runs, strided_runs
from connectors.transports.gpu_runtime import BatchMemcpy, BatchRows
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


# The batches mix whole blocks (64-byte aligned: the copy kernel) with odd pieces (copy_);
# stream_min_bytes=64 KiB spreads the ~1 MiB batches over every copy stream.
COPY_OPTIONS: list[dict[str, object]] = [
    {"copy": "auto"}, {"copy": "batch", "streams": 4, "stream_min_bytes": 65536},
    {"copy": "batch", "streams": 2, "stream_min_bytes": 65536, "issue_on": "destination"},
    {"copy": "runtime", "streams": 3, "stream_min_bytes": 65536, "issue_on": "source"},
    {"copy": "kernel"},
    {"copy": "torch"}]


def _ids(options: dict[str, object]) -> str:
    return "-".join(f"{k}={v}" for k, v in options.items())


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="copy='dma'"):
        IpcOptions(copy="dma")
    with pytest.raises(ValueError, match="streams must be >= 1"):
        IpcOptions(streams=0)
    with pytest.raises(ValueError, match="issue_on='peer'"):
        IpcOptions(issue_on="peer")


@pytest.mark.multi_gpu
@pytest.mark.parametrize("options", COPY_OPTIONS, ids=_ids)
def test_read_and_write_between_two_gpus(make_local: MakeLocal, spawn_peer: SpawnPeer,
                                         options: dict[str, object]) -> None:
    """Peer process on cuda:1, this process on cuda:0: NVLink / xGMI peer copies."""
    peer = spawn_peer("ipc", device="cuda:1")
    local = make_local("ipc", **options)
    check_read(local, peer, device="cuda:0")
    check_write(make_local("ipc", **options), peer, peer_fill="pattern1", device="cuda:0")
    assert local.copy_mode == _resolved(str(options["copy"]))  # type: ignore[attr-defined]


def _resolved(copy: str) -> str:
    """The mode a working GPU stack must end up in: no silent fallback after the batch ran."""
    if copy != "auto":
        return copy
    try:
        BatchMemcpy()
    except TransportError:
        return "kernel"
    return "batch"


@pytest.mark.gpu
@pytest.mark.parametrize("options", COPY_OPTIONS, ids=_ids)
def test_read_and_write_on_one_gpu(make_local: MakeLocal, spawn_peer: SpawnPeer,
                                   options: dict[str, object]) -> None:
    """Two processes sharing one GPU (the IPC path inside a device)."""
    peer = spawn_peer("ipc", device="cuda:0")
    check_read(make_local("ipc", **options), peer, device="cuda:0")
    check_write(make_local("ipc", **options), peer, peer_fill="pattern1", device="cuda:0")


LAYER_OPTIONS: list[dict[str, object]] = [
    {"copy": "auto"}, {"copy": "batch", "streams": 3, "stream_min_bytes": 4096},
    {"copy": "runtime", "streams": 2, "stream_min_bytes": 4096, "issue_on": "destination"}]


@pytest.mark.gpu
@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=_ids)
def test_layer_slices_on_one_gpu(make_local: MakeLocal, spawn_peer: SpawnPeer,
                                 options: dict[str, object]) -> None:
    """A layerwise WRITE's rows (one layer of runs of consecutive blocks): 2D copies."""
    peer = spawn_peer("ipc", device="cuda:0")
    check_read(make_local("ipc", **options), peer, device="cuda:0", segs=layer_segments(1))
    check_write(make_local("ipc", **options), peer, peer_fill="pattern1", device="cuda:0",
                segs=layer_segments(3))


@pytest.mark.multi_gpu
@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=_ids)
def test_layer_slices_between_two_gpus(make_local: MakeLocal, spawn_peer: SpawnPeer,
                                       options: dict[str, object]) -> None:
    peer = spawn_peer("ipc", device="cuda:1")
    check_read(make_local("ipc", **options), peer, device="cuda:0", segs=layer_segments(0))
    check_write(make_local("ipc", **options), peer, peer_fill="pattern1", device="cuda:0",
                segs=layer_segments(2))


def _expand(groups: np.ndarray) -> np.ndarray:
    rows = [(lo + i * lp, ro + i * rp, w) for lo, ro, w, h, lp, rp in groups.tolist()
            for i in range(h)]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def test_strided_runs_group_evenly_stepping_rows_and_keep_every_row_once() -> None:
    rows = merge_array(np.array(layer_segments(), dtype=np.int64))
    groups = strided_runs(rows)
    assert np.array_equal(_expand(groups), rows)
    # consecutive blocks on both sides (two runs: the remote side jumps once), steps of 2 and 3
    # blocks, three rows that fit no run of three
    assert groups[:, 3].tolist() == [20, 20, 10, 1, 1, 1]
    assert groups[:3, 4:].tolist() == [[4096, 4096], [4096, 4096], [8192, 12288]]
    gen = np.random.default_rng(5)
    for _ in range(200):  # any sorted rows: an exact, ordered cover, pitches wide enough
        n = int(gen.integers(0, 30))
        width = int(gen.choice([8, 16]))
        local = np.sort(gen.choice(np.arange(0, 4096, 16), n, replace=False))
        remote = gen.choice(np.arange(0, 8192, 16), n, replace=False)
        rows = np.stack([local, remote, np.full(n, width)], axis=1).astype(np.int64)
        groups = strided_runs(rows)
        assert np.array_equal(_expand(groups), rows)
        tall = groups[groups[:, 3] > 1]
        assert (tall[:, 4] >= tall[:, 2]).all() and (tall[:, 5] >= tall[:, 2]).all()


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


def test_split_runs_groups_consecutive_runs_of_about_equal_bytes() -> None:
    runs = np.array([(i * 100, i * 300, 100) for i in range(10)], dtype=np.int64)
    parts = split_runs(runs, max_parts=4, min_bytes=1)
    assert len(parts) == 4 and np.array_equal(np.concatenate(parts), runs)
    assert max(int(p[:, 2].sum()) for p in parts) <= 300
    # one part per min_bytes started, never more parts than runs, never an empty part
    assert len(split_runs(runs, max_parts=8, min_bytes=450)) == 3
    assert len(split_runs(runs[:2], max_parts=8, min_bytes=1)) == 2
    assert [len(p) for p in split_runs(runs[:0], max_parts=8, min_bytes=1)] == []
    uneven = np.array([(0, 0, 1000), (0, 0, 1), (0, 0, 1)], dtype=np.int64)
    assert [len(p) for p in split_runs(uneven, max_parts=3, min_bytes=1)] == [1, 2]
    assert split_bounds(uneven[:, 2], max_parts=3) == [0, 1, 3]
    assert split_bounds(uneven[:0, 2], max_parts=3) == [0]


def test_batch_rows_lay_out_addresses_for_the_driver() -> None:
    """The three arrays cuMemcpyBatchAsync reads: destination and source addresses (offset +
    region base, also past 2**63) and sizes, each contiguous uint64 at its base address."""
    runs = np.array([(0, 4096, 100), (8192, 0, 200), (512, 65536, 300)], dtype=np.int64)
    dst_base, src_base = 0x7F00_0000_0000, 0x8000_0000_0000_0000
    rows = BatchRows(runs[:, 1], runs[:, 0], runs[:, 2], dst_base=dst_base, src_base=src_base,
                     src_device=1, dst_device=0)
    assert len(rows) == 3
    read = [[ctypes.c_uint64.from_address(base + 8 * i).value for i in range(3)]
            for base in rows.bases]
    assert read == [[dst_base + 4096, dst_base, dst_base + 65536],
                    [src_base, src_base + 8192, src_base + 512], [100, 200, 300]]
    attrs = ctypes.cast(rows.attrs, ctypes.POINTER(ctypes.c_int * 5)).contents
    assert list(attrs) == [1, 1, 1, 1, 0]  # stream order; source on device 1, dest. on 0
