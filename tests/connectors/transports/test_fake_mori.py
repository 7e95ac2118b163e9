"""fake_mori behaves like mori.io where the mori transport and its tests rely on it."""

from __future__ import annotations

import time

import fake_mori as mori
import torch


def _pair(notify: bool = True) -> tuple[mori.IOEngine, mori.IOEngine]:
    config = mori.IOEngineConfig(host="127.0.0.1", port=0)
    initiator = mori.IOEngine("initiator", config)
    target = mori.IOEngine("target", config)
    backend = mori.RdmaBackendConfig(qp_per_transfer=2, num_worker_threads=1,
                                     enable_notification=notify)
    for engine in (initiator, target):
        engine.create_backend(mori.BackendType.RDMA, backend)
    initiator.register_remote_engine(target.get_engine_desc())
    target.register_remote_engine(initiator.get_engine_desc())
    return initiator, target


def _wait(status: mori.TransferStatus) -> None:
    deadline = time.monotonic() + 10
    while status.InProgress() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_descs_round_trip_through_pack() -> None:
    engine, _ = _pair()
    desc = engine.get_engine_desc()
    assert mori.EngineDesc.unpack(desc.pack()) == desc
    assert desc.key == "initiator" and desc.port > 0
    tensor = torch.ones(2, 34, dtype=torch.float32)
    mem = engine.register_torch_tensor(tensor)
    assert (mem.engine_key, mem.device_id, mem.data, mem.size, mem.loc) == \
        ("initiator", -1, tensor.data_ptr(), 272, mori.MemoryLocationType.CPU)
    assert mori.MemoryDesc.unpack(mem.pack()) == mem


def test_session_batch_read_and_inbound_notification() -> None:
    initiator, target = _pair()
    src = torch.arange(64 * 8, dtype=torch.int32).to(torch.uint8)
    dst = torch.zeros_like(src)
    local_mem, remote_mem = initiator.register_torch_tensor(dst), target.register_torch_tensor(src)
    session = initiator.create_session(local_mem, remote_mem)
    assert session is not None and session.alive()
    uid = session.allocate_transfer_uid()
    offsets = [i * 64 for i in range(8)]
    status = session.batch_read(offsets, offsets, [64] * 8, uid)
    _wait(status)
    assert status.Succeeded() and status.Code() is mori.StatusCode.SUCCESS
    assert torch.equal(src, dst)
    deadline = time.monotonic() + 5
    inbound = None
    while inbound is None and time.monotonic() < deadline:
        inbound = target.pop_inbound_transfer_status("initiator", uid)
        time.sleep(0.005)
    assert inbound is not None and inbound.Succeeded()
    assert target.pop_inbound_transfer_status("initiator", uid) is None  # popped once


def test_engine_level_calls_and_errors() -> None:
    initiator, target = _pair(notify=False)
    src = torch.arange(64).to(torch.uint8)
    dst = torch.zeros(64, dtype=torch.uint8)
    local_mem, remote_mem = initiator.register_torch_tensor(src), target.register_torch_tensor(dst)
    statuses = initiator.batch_write(local_mem, [0, 32], remote_mem, [32, 0], [32, 32],
                                     initiator.allocate_transfer_uid())
    assert len(statuses) == 2
    for status in statuses:
        _wait(status)
        assert status.Succeeded()
    assert torch.equal(dst, torch.cat([src[32:], src[:32]]))
    session = initiator.create_session(local_mem, remote_mem)
    assert session is not None
    bad = session.batch_read([0, 32], [0, 32], [32, 34], session.allocate_transfer_uid())
    assert bad.Failed() and bad.Code() is mori.StatusCode.ERR_INVALID_ARGS  # immediately
    initiator.deregister_remote_engine(target.get_engine_desc())
    assert initiator.create_session(local_mem, remote_mem) is None
