"""``disagg doctor``: right answers on a CPU machine, a stable JSON schema, and the GPU / RDMA
branches driven by faked facts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from disagg import __version__, doctor
from disagg.cli import main as cli_main
from disagg.common import platform as plat

GiB = 1 << 30
CPU = plat.PlatformInfo(plat.PlatformKind.CPU, 0, None, 1, None, torch.__version__, None, None)
MI300X = plat.PlatformInfo(plat.PlatformKind.ROCM, 2, "gfx942", 64, "AMD Instinct MI300X",
                           "2.6.0+rocm6.4", "6.4.43482", None)


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever this machine has, torch reports no GPU."""
    monkeypatch.setattr(plat, "current_platform", lambda: CPU)


@pytest.fixture
def on_mi300x(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[int, int], bool]:
    """Two faked MI300X GPUs; the returned dict decides peer access per (i, j)."""
    peers = {(0, 1): True, (1, 0): True}
    props = [SimpleNamespace(name="AMD Instinct MI300X", gcnArchName="gfx942:sramecc+:xnack-",
                             total_memory=192 * GiB, major=9, minor=4, uuid=f"GPU-{i}")
             for i in range(2)]
    monkeypatch.setattr(plat, "current_platform", lambda: MI300X)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda i, j: peers[(i, j)])
    return peers


def _text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert doctor.main(["--no-compile", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.usefixtures("on_cpu")
def test_cpu_machine_answers(capsys: pytest.CaptureFixture[str]) -> None:
    report = doctor.collect(compile_kernels=False)
    assert report["platform"]["kind"] == "cpu" and report["platform"]["device_count"] == 0
    assert report["platform"]["kernels"] == "torch"
    assert report["gpus"] == [] and report["peer_access"] is None
    transports = report["transports"]
    assert transports["tcp"] == {"usable": True, "reason": None}
    assert not transports["ipc"]["usable"] and "no CUDA/HIP GPU" in transports["ipc"]["reason"]
    assert set(transports) == {"tcp", "nixl", "ipc", "mori"}
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["disagg"] == __version__
    text = _text(capsys)
    assert "platform     cpu: CPU-only build of torch, no GPU visible" in text
    assert "gpus         none" in text
    assert "peer access  n/a (fewer than 2 GPUs)" in text
    assert "tcp   usable" in text


@pytest.mark.usefixtures("on_cpu")
def test_json_schema_is_stable(capsys: pytest.CaptureFixture[str]) -> None:
    report = json.loads(_text(capsys, "--json"))
    assert list(report) == ["schema_version", "platform", "gpus", "peer_access", "rdma",
                            "transports", "triton", "versions", "tp_plans"]
    assert report["schema_version"] == 1
    assert set(report["platform"]) == {"kind", "arch", "device_count", "warp_size",
                                       "device_name", "kernels", "torch_build"}
    assert set(report["rdma"]) == {"sysfs", "devices", "uverbs", "memlock_bytes"}
    assert all(set(t) == {"usable", "reason"} for t in report["transports"].values())
    assert set(report["triton"]) == {"available", "version", "aot"}
    assert set(report["versions"]) == {"python", "disagg", "torch", "hip", "cuda", "triton",
                                       "nixl", "mori", "pyzmq", "msgspec", "aiohttp",
                                       "transformers"}
    assert report["tp_plans"] == {"gpus": 0, "pairs": [], "model": None}


@pytest.mark.usefixtures("on_mi300x")
def test_rocm_gpus_and_full_peer_access(capsys: pytest.CaptureFixture[str]) -> None:
    report = doctor.collect(compile_kernels=False)
    assert report["platform"]["kind"] == "rocm" and report["platform"]["arch"] == "gfx942"
    assert report["platform"]["torch_build"] == "ROCm 6.4.43482"
    assert report["gpus"][1] == {"index": 1, "name": "AMD Instinct MI300X", "arch": "gfx942",
                                 "total_memory_bytes": 192 * GiB, "uuid": "GPU-1"}
    assert report["peer_access"] == {"matrix": [[True, True], [True, True]], "all": True,
                                     "missing": []}
    assert report["transports"]["ipc"]["usable"]
    assert report["versions"]["hip"] == "6.4.43482"
    text = _text(capsys)
    assert "platform     rocm gfx942, 2 x AMD Instinct MI300X, wavefront 64" in text
    assert "gpus         0  AMD Instinct MI300X  gfx942  192.0 GiB" in text
    assert "every pair of the 2 GPUs can access each other" in text


def test_missing_peer_access_is_named(on_mi300x: dict[tuple[int, int], bool],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    on_mi300x[(1, 0)] = False
    report = doctor.collect(compile_kernels=False)
    assert report["peer_access"]["missing"] == [[1, 0]] and not report["peer_access"]["all"]
    assert "NO peer access for 1->0" in _text(capsys)


def test_aot_targets_add_this_machines_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plat, "current_platform", lambda: MI300X)
    assert doctor.aot_targets() == ["hip:gfx942"]
    mi355 = plat.PlatformInfo(plat.PlatformKind.ROCM, 8, "gfx950", 64, "MI355X", "", "7", None)
    monkeypatch.setattr(plat, "current_platform", lambda: mi355)
    assert doctor.aot_targets() == ["hip:gfx942", "hip:gfx950"]
    h100 = plat.PlatformInfo(plat.PlatformKind.CUDA, 1, "sm_90", 32, "H100", "", None, "12.8")
    monkeypatch.setattr(plat, "current_platform", lambda: h100)
    assert doctor.aot_targets() == ["hip:gfx942", "cuda:90"]


@pytest.mark.usefixtures("on_cpu")
def test_triton_compiles_for_gfx942_without_a_gpu() -> None:
    pytest.importorskip("triton")
    facts = doctor.triton_facts(compile_kernels=True)
    gfx942 = facts["aot"]["hip:gfx942"]
    assert facts["available"] and gfx942["ok"], gfx942
    assert gfx942["kernel"].startswith("silu_and_mul") and "VGPRs" in gfx942["detail"]


def _fake_nic(root: Path, name: str, state: str = "4: ACTIVE") -> None:
    port = root / name / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text(state + "\n")
    (port / "link_layer").write_text("Ethernet\n")
    (port / "rate").write_text("400 Gb/sec (4X NDR)\n")
    (root / name / "device" / "net" / "eth2").mkdir(parents=True)
    (root / name / "device" / "numa_node").write_text("1\n")


def test_rdma_devices_from_sysfs(tmp_path: Path) -> None:
    _fake_nic(tmp_path / "ib", "mlx5_1", "1: DOWN")
    _fake_nic(tmp_path / "ib", "mlx5_0")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "uverbs0").touch()
    facts = doctor.rdma_facts(tmp_path / "ib", tmp_path / "dev")
    assert [d["name"] for d in facts["devices"]] == ["mlx5_0", "mlx5_1"]
    assert facts["devices"][0] == {
        "name": "mlx5_0", "numa_node": 1, "netdevs": ["eth2"],
        "ports": [{"port": 1, "state": "ACTIVE", "link_layer": "Ethernet",
                   "rate": "400 Gb/sec (4X NDR)"}]}
    assert facts["devices"][1]["ports"][0]["state"] == "DOWN"
    assert facts["uverbs"] == ["uverbs0"]
    lines = doctor.render_rdma(facts)
    assert lines[0] == "mlx5_0  port 1 ACTIVE Ethernet 400 Gb/sec (4X NDR)  net eth2  numa 1"


def test_rdma_without_verbs_device_files_says_how_to_fix_it(tmp_path: Path) -> None:
    _fake_nic(tmp_path / "ib", "ionic_0")
    facts = doctor.rdma_facts(tmp_path / "ib", tmp_path / "no-dev")
    facts["memlock_bytes"] = 65536
    text = "\n".join(doctor.render_rdma(facts))
    assert "--device=/dev/infiniband" in text
    assert "memlock 65536 bytes" in text and "ulimit -l unlimited" in text
    assert doctor.render_rdma(doctor.rdma_facts(tmp_path / "none", tmp_path)) == \
        [f"no RDMA devices ({tmp_path / 'none'} is empty or absent)"]


@pytest.mark.usefixtures("on_cpu")
def test_require_exits_1_with_one_line_per_unusable_transport(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.main(["--no-compile", "--require", "tcp"]) == 0
    capsys.readouterr()
    assert doctor.main(["--no-compile", "--json", "--require", "ipc", "--require", "warp"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("disagg doctor: transport ipc is not usable here: no CUDA/HIP")
    assert err[1] == ("disagg doctor: error: unknown transport 'warp'; choose one of "
                      "tcp, nixl, ipc, mori")


@pytest.mark.usefixtures("on_cpu")
def test_a_broken_probe_becomes_a_reason_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> dict[str, Any]:
        raise OSError("sysfs exploded")

    monkeypatch.setattr(doctor, "rdma_facts", broken)
    monkeypatch.setattr(doctor, "package_version", lambda *a: 1 / 0)
    report = doctor.collect(compile_kernels=False)
    assert report["rdma"]["error"] == "OSError: sysfs exploded"
    assert report["versions"]["torch"] == "broken (ZeroDivisionError: division by zero)"
    text = _text(capsys)
    assert "rdma         cannot read (OSError: sysfs exploded)" in text


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.main(["--frobnicate"]) == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


@pytest.mark.usefixtures("on_cpu")
def test_disagg_cli_routes_doctor(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["doctor", "--no-compile", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["platform"]["kind"] == "cpu"


def test_package_version_of_what_is_missing_is_none() -> None:
    assert doctor.package_version(("surely-not-installed-dist",), "surely_not_a_module") is None
    assert doctor.package_version(("msgspec",), "msgspec") is not None


@pytest.mark.usefixtures("on_cpu")
def test_without_a_gpu_no_tp_plan_fits_and_cpu_runs_any(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert "tp plans     no GPU: no TP plan fits on GPU; on CPU any --tensor-parallel-size " \
        "runs (gloo)" in _text(capsys)
    report = json.loads(_text(capsys, "--json", "--model", "builtin:tiny-llama"))
    fit = report["tp_plans"]["model"]
    assert (fit["num_heads"], fit["num_kv_heads"], fit["intermediate_size"]) == (4, 2, 384)
    assert [(s["size"], s["fits"]) for s in fit["tp"]] == [(1, True), (2, True), (4, True),
                                                           (8, False)]
    assert report["tp_plans"]["pairs"] == []


def test_tp_pairs_are_the_ones_whose_1p1d_fits_the_gpus() -> None:
    eight = doctor.tp_plans(8, None)
    assert eight["pairs"] == [[1, 1], [1, 2], [1, 4], [2, 1], [2, 2], [2, 4], [4, 1], [4, 2],
                              [4, 4]]
    assert doctor.tp_plans(3, None)["pairs"] == [[1, 1], [1, 2], [2, 1]]
    assert [8, 8] in doctor.tp_plans(16, None)["pairs"]
    lines = doctor.render_tp_plans(eight)
    assert lines == ["8 GPUs, 1P1D (--tp-prefill, --tp-decode) with tp_p + tp_d <= 8:",
                     "(1,1) (1,2) (1,4) (2,1) (2,2) (2,4) (4,1) (4,2) (4,4)"]
    assert doctor.render_tp_plans(doctor.tp_plans(1, None))[0].startswith(
        "1 GPU(s): no --tp-prefill/--tp-decode pair from 1, 2, 4, 8 fits")


def test_a_model_limits_the_pairs_to_tp_sizes_that_split_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({  # Qwen2-7B's shapes
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4}))
    plans = doctor.tp_plans(16, str(tmp_path))
    assert [s["fits"] for s in plans["model"]["tp"]] == [True, True, True, False]
    assert all(8 not in pair for pair in plans["pairs"]) and [4, 4] in plans["pairs"]
    lines = doctor.render_tp_plans(plans)
    assert lines[-2] == f"{tmp_path} (28 heads, 4 KV heads, intermediate 18944): tp 1, 2, 4 " \
        "split it"
    assert lines[-1].startswith("tp 8 does not: tensor_parallel_size 8 does not split this "
                                "model: it must divide num_attention_heads (28)")


def test_an_unreadable_model_is_a_reason_and_the_pairs_ignore_it(tmp_path: Path) -> None:
    plans = doctor.tp_plans(2, str(tmp_path / "missing"))
    assert plans["pairs"] == [[1, 1]]
    assert "is not a model directory" in plans["model"]["error"]
    assert doctor.render_tp_plans(plans)[-1].startswith(f"{tmp_path / 'missing'}: cannot read")


@pytest.mark.usefixtures("on_mi300x")
def test_two_gpus_fit_only_tp_1_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.collect(compile_kernels=False)["tp_plans"]["pairs"] == [[1, 1]]
    text = _text(capsys)
    assert "tp plans     2 GPUs, 1P1D (--tp-prefill, --tp-decode) with tp_p + tp_d <= 2:" in text
    assert "             (1,1)" in text


def test_tp_fit_is_the_engines_rule_moe_included() -> None:
    pytest.importorskip("torch")
    fit = doctor.model_tp_fit("builtin:tiny-moe")  # 4 heads, 2 KV heads, experts of 96
    by_size = {s["size"]: s for s in fit["tp"]}
    assert by_size[2]["fits"] and by_size[4]["fits"]
    assert not by_size[8]["fits"] and "num_attention_heads (4)" in by_size[8]["reason"]


