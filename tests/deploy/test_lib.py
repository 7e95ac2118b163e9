"""lib.sh's real (not dry) mode, driven through single_node.sh with fake ``disagg`` binaries:
preflight, start-up waits, one-line failures, and that every child is stopped at the end."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from real_mode import DEADLINE_S, deployment, free_port_run, gone, records, wait_ready

pytestmark = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="the scripts' health waits use curl")


def test_instances_then_proxy_start_and_a_dead_instance_stops_everything(
        tmp_path: Path) -> None:
    with deployment(tmp_path) as (proc, base):
        out = wait_ready(proc)
        recorded = records(tmp_path)
        assert sorted(recorded) == [base, base + 1, base + 2]
        assert "started prefill-0" in out and "started proxy" in out
        assert recorded[base + 1]["HIP_VISIBLE_DEVICES"] == "0"
        assert recorded[base + 2]["HIP_VISIBLE_DEVICES"] == "1"
        proxy_argv = recorded[base]["argv"]
        assert isinstance(proxy_argv, list)
        assert proxy_argv[proxy_argv.index("--decode") + 1] == f"http://127.0.0.1:{base + 2}"
        os.kill(int(str(recorded[base + 2]["pid"])), signal.SIGKILL)
        assert proc.wait(DEADLINE_S) == 1
        assert proc.stderr is not None
        err = proc.stderr.read().strip().splitlines()
        assert err[-1].startswith("single_node.sh: decode-0 exited")
        assert "stopping everything" in err[-1]
        assert gone(int(str(recorded[base + 1]["pid"])))
        assert gone(int(str(recorded[base]["pid"])))


def test_sigterm_stops_every_child_and_exits_0(tmp_path: Path) -> None:
    with deployment(tmp_path) as (proc, _):
        wait_ready(proc)
        pids = [int(str(r["pid"])) for r in records(tmp_path).values()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE_S) == 0
        assert all(gone(pid) for pid in pids)


def test_tp_instances_run_on_their_own_gpus_with_their_tp_size(tmp_path: Path) -> None:
    gpus = ("--prefill-gpus", "0,1", "--decode-gpus", "2,3,4,5", "--tp-prefill", "2",
            "--tp-decode", "2")
    with deployment(tmp_path, gpu_args=gpus) as (proc, base):
        wait_ready(proc)
        recorded = records(tmp_path)
        prefill, decode = recorded[base + 1], recorded[base + 2]
        assert (prefill["HIP_VISIBLE_DEVICES"], decode["HIP_VISIBLE_DEVICES"]) == \
            ("0,1", "2,3,4,5")
        for record, dp in ((prefill, "1"), (decode, "2")):
            argv = record["argv"]
            assert isinstance(argv, list)
            assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
            assert argv[argv.index("--data-parallel-size") + 1] == dp


def test_too_few_gpus_for_the_tp_size_start_nothing(tmp_path: Path) -> None:
    gpus = ("--prefill-gpus", "0", "--decode-gpus", "1,2", "--tp-decode", "4")
    with deployment(tmp_path, gpu_args=gpus) as (proc, _):
        assert proc.wait(DEADLINE_S) == 2
        assert proc.stderr is not None
        assert proc.stderr.read().strip() == ("single_node.sh: error: 1 decode instance(s) x "
                                              "tp 4 need 4 GPUs; --decode-gpus lists 2")
        assert records(tmp_path) == {} and not (tmp_path / "logs").exists()


def test_failed_preflight_starts_nothing(tmp_path: Path) -> None:
    with deployment(tmp_path, FAKE_DOCTOR_FAIL="1") as (proc, _):
        assert proc.wait(DEADLINE_S) == 1
        assert proc.stderr is not None
        assert proc.stderr.read().strip() == (
            f"single_node.sh: this node cannot use the tcp transport (see "
            f"{tmp_path / 'logs'}/doctor.txt)")
        assert records(tmp_path) == {}


def test_an_instance_dying_during_start_up_is_one_line(tmp_path: Path) -> None:
    base = free_port_run(3)
    with deployment(tmp_path, base, FAKE_EXIT_PORT=str(base + 2)) as (proc, _):
        assert proc.wait(DEADLINE_S) == 1
        assert proc.stderr is not None
        assert proc.stderr.read().strip().splitlines()[-1] == (
            f"single_node.sh: decode-0 exited during start-up; see "
            f"{tmp_path / 'logs'}/decode-0.log")
        prefill_pid = int(str(records(tmp_path)[base + 1]["pid"]))
        assert gone(prefill_pid)
