"""The GPU memory budget: its split, the per-process readers (NVML, KFD) against fakes that
behave as the real interfaces, the ready line, and (GPU) co-located instances inside budget."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import torch

from bench import memory_budget
from disagg.common.config import EngineConfig, ModelConfig
from disagg.common.memory_split import describe_memory
from disagg.common.protocol import EngineCoreReadyResponse
from disagg.engine.gpu_memory import (
    MemorySplit,
    kfd_process_bytes,
    nvml_process_bytes,
)
from disagg.server.engine_client import apply_ready_responses
from disagg.server.server_main import startup_lines

BUS = "00000000:18:00.0"


def split(**kw: Any) -> MemorySplit:
    base = dict(total=100 * 2**30, utilization=0.25, weights=10 * 2**30,
                activations=2**30, graphs=2**29, other=2**28)
    return MemorySplit(**(base | kw))


def test_the_kv_cache_gets_what_the_budget_leaves() -> None:
    s = split()
    assert s.budget == 25 * 2**30
    assert s.kv_room == 25 * 2**30 - (10 * 2**30 + 2**30 + 2**29 + 2**28)
    assert split(weights=30 * 2**30).kv_room < 0  # the planner then refuses with the numbers


def test_the_ready_line_the_benchmark_reads_back() -> None:
    """bench.memory_budget parses the engine's line: the two must not drift apart."""
    line = describe_memory(split(kv=12 * 2**30).parts() | {"held": int(24.5 * 2**30)})
    assert line == split(kv=12 * 2**30).describe() + "; the process holds 24.50 GiB"
    assert line.startswith("GPU memory budget 25.00 GiB (0.25 x 100.00): weights 10.00, "
                           "KV 12.00, graphs 0.50, activations 1.00, other 0.25")
    found = memory_budget._BUDGET.search("INFO dp0: " + line)
    assert found is not None
    assert float(found.group(1)) == 25.0
    assert found.group(4) == "weights 10.00, KV 12.00, graphs 0.50, activations 1.00, other 0.25"


def test_the_server_logs_each_ranks_split() -> None:
    def ready(rank: int, memory: dict[str, int] | None) -> EngineCoreReadyResponse:
        return EngineCoreReadyResponse(
            max_model_len=64, num_gpu_blocks=4, block_size=16, dtype="bfloat16", version="t",
            dp_rank=rank, dp_size=2, max_num_seqs=8, max_num_batched_tokens=64,
            kv_role="kv_both", engine_id=f"e{rank}", device=f"cuda:{rank}", model="m",
            memory_bytes=memory)

    parts = {"total": 4 * 2**30, "budget": 2**30, "weights": 2**29}
    synced = apply_ready_responses(None, [ready(0, parts), ready(1, None)])
    cfg = EngineConfig(model=ModelConfig(model="builtin:tiny-llama", served_model_name="m"))
    lines = startup_lines(cfg, synced, "http://127.0.0.1:1")
    assert f"dp0: {describe_memory(parts)}" in lines
    assert describe_memory(parts).startswith("GPU memory budget 1.00 GiB (0.25 x 4.00): "
                                             "weights 0.50, KV 0.00")
    assert not any(line.startswith("dp1:") for line in lines)
    # an engine that predates the field still decodes
    old = msgspec.msgpack.encode(ready(0, None))
    assert msgspec.msgpack.decode(old, type=EngineCoreReadyResponse).memory_bytes is None


class FakeNvml:
    """libnvidia-ml's four calls as ctypes sees them: int status, out-parameters by pointer."""

    def __init__(self, processes: list[tuple[int, int]], bus: str = BUS, init_rc: int = 0,
                 too_many: bool = False) -> None:
        self.processes, self.bus, self.init_rc, self.too_many = processes, bus, init_rc, too_many

    def nvmlInit_v2(self) -> int:
        return self.init_rc

    def nvmlDeviceGetHandleByPciBusId_v2(self, bus: bytes, handle: Any) -> int:
        if bus.decode() != self.bus:
            return 2  # NVML_ERROR_INVALID_ARGUMENT
        handle._obj.value = 0x1234
        return 0

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any, count: Any,
                                                 procs: Any) -> int:
        if len(self.processes) > count._obj.value or self.too_many:
            count._obj.value = len(self.processes)
            return 7  # NVML_ERROR_INSUFFICIENT_SIZE
        for i, (pid, used) in enumerate(self.processes):
            procs[i].pid, procs[i].usedGpuMemory = pid, used
        count._obj.value = len(self.processes)
        return 0


def test_nvml_gives_this_pids_memory_on_this_gpu() -> None:
    nv = FakeNvml([(11, 5 * 2**30), (42, 7 * 2**30)])
    assert nvml_process_bytes(BUS, 42, nv) == 7 * 2**30
    assert nvml_process_bytes(BUS, 99, nv) is None  # a container's pid namespace hides us
    assert nvml_process_bytes("00000000:19:00.0", 42, nv) is None  # another GPU
    assert nvml_process_bytes(BUS, 42, FakeNvml([(42, 1)], init_rc=9)) is None
    assert nvml_process_bytes(BUS, 42, FakeNvml([(42, 1)], too_many=True)) is None


def test_nvml_missing_is_unknown_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> Any:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert nvml_process_bytes(BUS, 1) is None
    assert nvml_process_bytes(BUS, 1, object()) is None  # a library without the calls


def test_kfd_sums_the_processes_vram_files(tmp_path: Path) -> None:
    proc = tmp_path / "77"
    proc.mkdir()
    (proc / "vram_41582").write_text(f"{3 * 2**30}\n")
    (proc / "vram_9000").write_text("0\n")
    (proc / "sdma_41582").write_text("123\n")
    assert kfd_process_bytes(77, tmp_path) == 3 * 2**30
    assert kfd_process_bytes(78, tmp_path) is None
    (tmp_path / "79").mkdir()
    assert kfd_process_bytes(79, tmp_path) is None
    (proc / "vram_1").write_text("garbage")
    assert kfd_process_bytes(77, tmp_path) is None


def test_process_trees_cover_an_instances_engine_children() -> None:
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert {os.getpid(), child.pid} <= memory_budget.descendants(os.getpid())
        assert os.getpid() not in memory_budget.descendants(child.pid)
    finally:
        child.kill()
        child.wait()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or shutil.which("nvidia-smi") is None
                    and not Path("/sys/class/kfd").exists(),
                    reason="needs a GPU and its per-process memory count")
def test_three_co_located_instances_stay_inside_their_budgets(tmp_path: Path) -> None:
    """Fractions summing to 0.92 on one GPU: all start, serve a concurrency-64 load each at
    once, and no instance's processes ever hold more than its budget + 2%."""
    model = memory_budget.write_model(memory_budget.SMALL_SHAPE, tmp_path)
    rows = memory_budget.run_set([0.17, 0.25, 0.5], model, ["--max-model-len", "4096"],
                                 tmp_path, 18400, num_prompts=128)
    for r in rows:
        assert r["survived"], r
        assert r["completed"] == 128, r
        assert r["peak_gib"] <= r["budget_gib"] * (1 + memory_budget.TOLERANCE), r
        assert r["graphs"] > 0 and r["peak_gib"] > 0.5 * r["budget_gib"], r


def test_metrics_expose_each_ranks_split_in_bytes() -> None:
    """/metrics: disagg_gpu_memory_bytes{dp_rank, part} from each ready handshake; a CPU
    engine core (no split) adds no series."""
    from metrics_pages import fake_engine
    from prom_text import value

    from disagg.server.metrics import ServerMetrics
    from disagg.server.metrics_render import render_instance_metrics

    parts = split(kv=12 * 2**30).parts() | {"held": 24 * 2**30}
    engine = fake_engine({})
    engine.synced.ready = (SimpleNamespace(dp_rank=0, memory_bytes=parts, kv_cache_dtype=None),
                           SimpleNamespace(dp_rank=1, memory_bytes=None, kv_cache_dtype=None))
    text = render_instance_metrics(engine, ServerMetrics("m"), "m")
    assert value(text, "disagg_gpu_memory_bytes", model_name="m", dp_rank="0",
                 part="budget") == 25 * 2**30
    assert value(text, "disagg_gpu_memory_bytes", dp_rank="0", part="kv") == 12 * 2**30
    assert value(text, "disagg_gpu_memory_bytes", dp_rank="0", part="held") == 24 * 2**30
    assert "dp_rank=\"1\"" not in text
    assert "disagg_gpu_memory_bytes" not in render_instance_metrics(
        fake_engine({}), ServerMetrics("m"), "m")
