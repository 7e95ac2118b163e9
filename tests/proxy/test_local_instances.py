"""Planning local instances: ports, kv-transfer-config, command lines, devices."""

from __future__ import annotations

import json
import socket

import pytest

from disagg.common import platform
from proxy.config import TransferMode
from proxy.local_instances import (
    KV_PORT_STRIDE,
    LaunchConfig,
    check_ports_free,
    find_port_blocks,
    kv_transfer_config,
    plan_instances,
    resolve_device,
)
from proxy.registration import KVRole
from proxy.supervisor import LaunchError


def _cfg(**overrides: object) -> LaunchConfig:
    values: dict[str, object] = {"num_prefill": 2, "num_decode": 1, "model": "builtin:tiny-llama",
                                 "transport": "tcp", "mode": TransferMode.READ, "device": "cpu",
                                 "instance_command": ("python", "-m", "disagg.cli")}
    values.update(overrides)
    return LaunchConfig(**values)  # type: ignore[arg-type]


def test_kv_transfer_config_matches_the_instance_contract() -> None:
    cfg = json.loads(kv_transfer_config(KVRole.PRODUCER, "nixl", TransferMode.WRITE, 21000))
    assert cfg == {"kv_connector": "PDConnector", "kv_role": "kv_producer",
                   "kv_connector_extra_config": {"transport": "nixl", "mode": "write",
                                                 "base_port": 21000}}


def test_plan_assigns_names_roles_distinct_ports_and_arguments() -> None:
    specs = plan_instances(_cfg(instance_args=("--max-num-seqs", "8")))
    assert [s.name for s in specs] == ["prefill-0", "prefill-1", "decode-0"]
    assert [s.role for s in specs] == [KVRole.PRODUCER, KVRole.PRODUCER, KVRole.CONSUMER]
    assert len({s.port for s in specs}) == 3
    kv_bases = []
    for spec in specs:
        argv = list(spec.argv)
        assert argv[:5] == ["python", "-m", "disagg.cli", "serve", "builtin:tiny-llama"]
        assert argv[argv.index("--port") + 1] == str(spec.port)
        assert argv[argv.index("--device") + 1] == "cpu"
        assert argv[-2:] == ["--max-num-seqs", "8"]
        kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
        assert kv["kv_role"] == spec.role.value
        kv_bases.append(kv["kv_connector_extra_config"]["base_port"])
        assert spec.url == f"http://127.0.0.1:{spec.port}"
        assert "OMP_NUM_THREADS" in spec.env or "CUDA_VISIBLE_DEVICES" not in spec.env
    kv_bases.sort()
    assert all(b - a >= KV_PORT_STRIDE for a, b in zip(kv_bases, kv_bases[1:], strict=False))


def test_given_base_ports_are_used_in_order() -> None:
    base = find_port_blocks(1, 8)[0]
    kv_base = find_port_blocks(1, 3 * KV_PORT_STRIDE)[0]
    specs = plan_instances(_cfg(instance_base_port=base, kv_base_port=kv_base))
    assert [s.port for s in specs] == [base, base + 1, base + 2]
    argv = specs[2].argv
    kv = json.loads(argv[list(argv).index("--kv-transfer-config") + 1])
    assert kv["kv_connector_extra_config"]["base_port"] == kv_base + 2 * KV_PORT_STRIDE


def test_ports_in_use_are_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port {port} is already in use"):
            check_ports_free([port])


def test_device_auto_is_cpu_for_the_builtin_model() -> None:
    assert resolve_device("auto", model_given=False) == "cpu"
    assert resolve_device("cpu", model_given=True) == "cpu"


def test_gpus_are_split_from_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from disagg.common.platform import visible_devices_env

    env_name = visible_devices_env()
    monkeypatch.setenv(env_name, "4,5,6,7")
    specs = plan_instances(_cfg(device="cuda", num_prefill=1, num_decode=1,
                                gpus_per_instance=2))
    assert [s.env[env_name] for s in specs] == ["4,5", "6,7"]
    with pytest.raises(LaunchError, match="need 6 GPUs; 4 visible"):
        plan_instances(_cfg(device="cuda", num_prefill=2, num_decode=1, gpus_per_instance=2))


@pytest.mark.parametrize("transport", ["ipc", "mori"])
def test_peer_copy_transports_also_see_the_other_instances_gpus(
        monkeypatch: pytest.MonkeyPatch, transport: str) -> None:
    """ipc/mori open the peer's GPU memory: each instance computes on its own GPUs (listed
    first, so they are its devices 0..) and sees the others' after them."""
    from disagg.common.platform import visible_devices_env

    env_name = visible_devices_env()
    monkeypatch.setenv(env_name, "4,5,6,7")
    specs = plan_instances(_cfg(device="cuda", num_prefill=1, num_decode=2,
                                gpus_per_instance=1, transport=transport))
    assert [s.env[env_name] for s in specs] == ["4,5,6", "5,4,6", "6,4,5"]


@pytest.fixture
def eight_mi300x(monkeypatch: pytest.MonkeyPatch) -> str:
    """Torch sees 8 faked ROCm GPUs and no *_VISIBLE_DEVICES is inherited; returns the
    variable that selects GPUs for a child."""
    info = platform.PlatformInfo(platform.PlatformKind.ROCM, 8, "gfx942", 64, "MI300X",
                                 "2.6.0+rocm6.4", "6.4", None)
    monkeypatch.setattr(platform, "current_platform", lambda: info)
    for var in ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    return "HIP_VISIBLE_DEVICES"


def _argv_flag(argv: tuple[str, ...], flag: str) -> str:
    return argv[list(argv).index(flag) + 1]


def test_tp_sizes_reach_each_role_and_cpu_ranks_share_the_cores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    specs = plan_instances(_cfg(num_prefill=2, num_decode=1, tp_prefill=2, tp_decode=4,
                                gpus_per_instance=1))  # ignored on CPU: nothing is placed
    assert [_argv_flag(s.argv, "--tensor-parallel-size") for s in specs] == ["2", "2", "4"]
    # 2 x 2 + 1 x 4 = 8 ranks, each with its eighth of the 64 cores; no GPU variable
    assert all(s.env == {"OMP_NUM_THREADS": "8"} for s in specs)


def test_mixed_tp_instances_get_disjoint_contiguous_gpus(eight_mi300x: str) -> None:
    specs = plan_instances(_cfg(device="cuda", num_prefill=1, num_decode=2, tp_prefill=4,
                                tp_decode=2))
    assert [s.name for s in specs] == ["prefill-0", "decode-0", "decode-1"]
    assert [s.env[eight_mi300x] for s in specs] == ["0,1,2,3", "4,5", "6,7"]
    assert [_argv_flag(s.argv, "--tensor-parallel-size") for s in specs] == ["4", "2", "2"]
    assert all("OMP_NUM_THREADS" not in s.env for s in specs)


def test_placement_counts_data_parallel_ranks_from_the_instance_arguments(
        eight_mi300x: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eight_mi300x, "2,3,5,7,8,9,10,11")  # inherited ids are kept in order
    specs = plan_instances(_cfg(device="cuda", num_prefill=1, num_decode=1, tp_prefill=2,
                                instance_args=("--data-parallel-size=2",)))
    assert [s.env[eight_mi300x] for s in specs] == ["2,3,5,7", "8,9"]
    specs = plan_instances(_cfg(device="cuda", num_prefill=1, num_decode=1, tp_decode=2,
                                instance_args=("-dp", "2")))
    assert [s.env[eight_mi300x] for s in specs] == ["2,3", "5,7,8,9"]


def test_too_few_gpus_is_one_line_naming_the_count_needed(eight_mi300x: str) -> None:
    with pytest.raises(LaunchError) as info:
        plan_instances(_cfg(device="cuda", num_prefill=2, num_decode=1, tp_prefill=4,
                            tp_decode=2))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("2 prefill x 4 GPU(s) (tp 4) + 1 decode x 2 GPU(s) (tp 2) "
                              "need 10 GPUs; 8 visible (HIP_VISIBLE_DEVICES=unset)")
    with pytest.raises(LaunchError, match="is fewer than the 4 GPUs a prefill instance needs"):
        plan_instances(_cfg(device="cuda", tp_prefill=4, gpus_per_instance=2))


def test_the_kv_params_key_goes_to_every_instance_in_its_environment() -> None:
    specs = plan_instances(_cfg(kv_params_key="k" * 32))
    assert all(s.env["DISAGG_KV_PARAMS_KEY"] == "k" * 32 for s in specs)
    assert all("k" * 32 not in " ".join(s.argv) for s in specs)  # not visible in ps
    assert all("DISAGG_KV_PARAMS_KEY" not in s.env for s in plan_instances(_cfg()))
