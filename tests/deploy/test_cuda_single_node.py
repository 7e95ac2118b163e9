"""deploy/cuda/single_node.sh (single_node.sh --platform cuda): the NVIDIA plan in --dry-run,
commands the real parsers accept, and the nvidia-smi check in real mode."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from deploy_plan import CUDA_SINGLE_NODE, Command, clean_env, dry_run, run_script, usage_error
from real_mode import DEADLINE_S, deployment, records, wait_ready

from disagg.cli import build_parser, engine_config_from_args
from proxy.launcher import parse_args as parse_proxy_args

ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
NVIDIA_SMI = "nvidia-smi"


def _serves(commands: list[Command]) -> list[Command]:
    return [c for c in commands if c.argv[:2] == ["disagg", "serve"]]


def test_default_is_1p_on_gpus_0_3_and_1d_on_4_7_with_cuda_visibility_and_no_rocm_knobs(
        ) -> None:
    commands = dry_run(CUDA_SINGLE_NODE, "--model", "/models/llama")
    assert [c.program for c in commands] == [NVIDIA_SMI, "disagg", "disagg", "disagg",
                                             "disagg-proxy"]
    smi, doctor, prefill, decode, _ = commands
    assert smi.argv == [NVIDIA_SMI, "--query-gpu=index,pci.bus_id,name",
                        "--format=csv,noheader"]
    assert "nvidia-smi must list GPUs 0-7" in smi.comment
    assert doctor.argv == ["disagg", "doctor", "--no-compile", "--require", "ipc"]
    assert doctor.env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", **ORDER}
    # own GPUs first (DP rank r -> device r), then the peer's, which ipc must be able to open
    assert prefill.env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", **ORDER}
    assert decode.env == {"CUDA_VISIBLE_DEVICES": "4,5,6,7,0,1,2,3", **ORDER}
    assert "GPUs 0,1,2,3 as DP ranks 0-3 on CUDA devices 0-3" in prefill.comment
    assert prefill.kv_config()["kv_connector_extra_config"]["transport"] == "ipc"
    plan = run_script(CUDA_SINGLE_NODE, "--model", "m", "--dry-run").stdout
    assert plan.startswith("# disagg on one NVIDIA node: 1 prefill x 4 GPU(s)")
    assert "HIP_" not in plan and "HIPBLASLT" not in plan


def test_every_command_is_accepted_by_the_real_parsers() -> None:
    commands = dry_run(CUDA_SINGLE_NODE, "--model", "builtin:tiny-llama", "--transport", "nixl",
                       "--mode", "write", "--prefill-gpus", "0,1", "--decode-gpus", "2,3",
                       "--num-prefill", "2", "--num-decode", "2", "--proxy-port", "9000")
    serves = _serves(commands)
    for serve in serves:
        cfg = engine_config_from_args(build_parser().parse_args(serve.argv[1:]))
        assert cfg.model.device == "cuda"
        assert cfg.kv_transfer is not None
        assert cfg.kv_transfer.kv_connector_extra_config["transport"] == "nixl"
    # nixl opens no peer IPC handle: each instance sees only its own GPU
    assert [s.env for s in serves] == [{"CUDA_VISIBLE_DEVICES": gpu, **ORDER} for gpu in "0123"]
    proxy, = [c for c in commands if c.program == "disagg-proxy"]
    args = parse_proxy_args(proxy.argv[1:])
    assert (args.port, args.mode) == (9000, "write")
    assert args.prefill == ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]
    assert args.decode == ["http://127.0.0.1:8102", "http://127.0.0.1:8103"]


def test_tensor_parallel_plan_names_cuda_devices() -> None:
    commands = dry_run(CUDA_SINGLE_NODE, "--model", "m", "--tp-prefill", "4", "--tp-decode", "2")
    prefill, decode = _serves(commands)
    assert "TP ranks 0-3 of one engine core on CUDA devices 0-3" in prefill.comment
    assert "DP ranks 0-1 x TP ranks 0-1 on CUDA devices 0-3" in decode.comment
    assert (decode.flag("--data-parallel-size"), decode.flag("--tensor-parallel-size")) == \
        ("2", "2")


def test_nvidia_smi_check_covers_the_highest_gpu_used() -> None:
    smi = dry_run(CUDA_SINGLE_NODE, "--model", "m", "--prefill-gpus", "0", "--decode-gpus",
                  "3")[0]
    assert smi.program == NVIDIA_SMI and "GPUs 0-3" in smi.comment


def test_callers_device_order_wins_and_rocm_plan_is_unchanged() -> None:
    commands = dry_run(CUDA_SINGLE_NODE, "--model", "m",
                       env=clean_env(CUDA_DEVICE_ORDER="FASTEST_FIRST"))
    assert {c.env["CUDA_DEVICE_ORDER"] for c in _serves(commands)} == {"FASTEST_FIRST"}
    rocm = dry_run("single_node.sh", "--model", "m", "--platform", "rocm")
    assert rocm == dry_run("single_node.sh", "--model", "m")
    assert NVIDIA_SMI not in {c.program for c in rocm}


@pytest.mark.parametrize(("args", "message"), [
    (("--model", "m", "--transport", "mori"), "--transport mori needs --platform rocm"),
    (("--model", "m", "--platform", "metal"), "--platform must be one of: rocm cuda"),
    (("--model", "m", "--tp-decode", "8"),
     "1 decode instance(s) x tp 8 need 8 GPUs; --decode-gpus lists 4"),
])
def test_bad_arguments_are_one_line_usage_errors(args: tuple[str, ...], message: str) -> None:
    assert message in usage_error(CUDA_SINGLE_NODE, *args)


def test_help_names_the_platform_option() -> None:
    proc = run_script(CUDA_SINGLE_NODE, "--help")
    assert proc.returncode == 0 and "--platform NAME" in proc.stdout


def _smi(num_gpus: int) -> dict[str, str]:
    """A fake nvidia-smi that lists ``num_gpus`` H100s."""
    lines = "\\n".join(f"{i}, 00000000:{i:02X}:00.0, NVIDIA H100 80GB HBM3"
                       for i in range(num_gpus))
    return {NVIDIA_SMI: f"printf '{lines}\\n'"}


@pytest.mark.skipif(shutil.which("curl") is None, reason="the scripts' health waits use curl")
def test_real_mode_starts_instances_on_their_cuda_gpus(tmp_path: Path) -> None:
    with deployment(tmp_path, script=CUDA_SINGLE_NODE, tools=_smi(2)) as (proc, base):
        wait_ready(proc)
        recorded = records(tmp_path)
        prefill, decode = recorded[base + 1], recorded[base + 2]
        assert (prefill["CUDA_VISIBLE_DEVICES"], decode["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
        assert prefill["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert prefill["HIP_VISIBLE_DEVICES"] is None
        assert (tmp_path / "logs" / "nvidia-smi.txt").read_text().count("H100") == 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="the scripts' health waits use curl")
@pytest.mark.parametrize(("tools", "message"), [
    (_smi(1), "the plan uses GPU 1 but nvidia-smi lists 1 GPU(s)"),
    ({NVIDIA_SMI: "echo 'NVIDIA-SMI has failed' >&2; exit 9"}, "nvidia-smi failed"),
])
def test_real_mode_refuses_a_plan_nvidia_smi_cannot_see(
        tmp_path: Path, tools: dict[str, str], message: str) -> None:
    with deployment(tmp_path, script=CUDA_SINGLE_NODE, tools=tools) as (proc, _):
        assert proc.wait(DEADLINE_S) == 1
        assert proc.stderr is not None
        err = proc.stderr.read().strip()
        assert err.startswith(f"single_node.sh: {message}") and "\n" not in err
        assert records(tmp_path) == {}
