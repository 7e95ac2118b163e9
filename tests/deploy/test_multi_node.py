"""deploy/mi300x/multi_node.sh --dry-run: one instance per GPU pinned to its NIC, the RDMA
environment per transport, node address discovery, and the proxy's view of every node."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from deploy_plan import Command, clean_env, dry_run, usage_error

from connectors.protocol import kv_ports
from connectors.transports.mori import MoriOptions
from connectors.transports.tcp import TcpOptions
from connectors.transports.validation import build_options
from disagg.cli import build_parser
from disagg.common.config import KVTransferConfig
from proxy.launcher import parse_args as parse_proxy_args

SCRIPT = "multi_node.sh"
NICS = ",".join(f"mlx5_{i}" for i in range(8))
NODE = ("--model", "/models/llama", "--node-ip", "10.1.0.5")


def _serves(commands: list[Command]) -> list[Command]:
    return [c for c in commands if c.argv[:2] == ["disagg", "serve"]]


def test_prefill_node_runs_one_instance_per_gpu_each_on_its_own_nic() -> None:
    commands = dry_run(SCRIPT, "--role", "prefill", *NODE, "--nics", NICS, "--gid-index", "3",
                       "--socket-ifname", "eth0")
    doctor = commands[0]
    serves = _serves(commands)
    assert doctor.argv == ["disagg", "doctor", "--no-compile", "--require", "mori"]
    assert len(serves) == 8
    for k, serve in enumerate(serves):
        assert serve.env == {"HIP_VISIBLE_DEVICES": str(k), "HIP_FORCE_DEV_KERNARG": "1",
                             "TORCH_BLAS_PREFER_HIPBLASLT": "1",
                             "MORI_RDMA_DEVICES": f"mlx5_{k}", "MORI_IB_GID_INDEX": "3",
                             "MORI_SOCKET_IFNAME": "eth0"}
        assert f"NIC mlx5_{k}" in serve.comment
        extra = serve.kv_config()["kv_connector_extra_config"]
        assert serve.kv_config()["kv_role"] == "kv_producer"
        # the KV address is the node's; HTTP listens everywhere for the proxy on another node
        assert extra["host"] == "10.1.0.5" and serve.flag("--host") == "0.0.0.0"
        assert extra["transport_options"] == {"backend": "rdma", "port": 21000 + k}
        assert build_options(MoriOptions, "mori", extra["transport_options"]).port == 21000 + k
        assert extra["base_port"] == 20000 + 16 * k
        assert serve.flag("--port") == str(8100 + k)


def test_serve_lines_parse_with_the_real_cli() -> None:
    commands = dry_run(SCRIPT, "--role", "decode", *NODE, "--nics", NICS, "--mode", "write",
                       "--instance-arg=--max-model-len", "--instance-arg", "32768")
    for serve in _serves(commands):
        args = build_parser().parse_args(serve.argv[1:])
        kv = KVTransferConfig.from_json(args.kv_transfer_config)
        assert kv is not None and kv.kv_role == "kv_consumer"
        assert kv.extra("mode", None) == "write"
        assert args.max_model_len == 32768 and args.data_parallel_size == 1


def test_dp_instances_list_their_gpus_nics_and_take_free_transport_ports() -> None:
    commands = dry_run(SCRIPT, "--role", "decode", *NODE, "--nics", NICS,
                       "--gpus-per-instance", "4")
    first, second = _serves(commands)
    assert first.env["HIP_VISIBLE_DEVICES"] == "0,1,2,3"
    assert second.env["MORI_RDMA_DEVICES"] == "mlx5_4,mlx5_5,mlx5_6,mlx5_7"
    assert first.flag("--data-parallel-size") == "4"
    # with several DP ranks per instance a fixed transport port would be shared: none is set
    assert first.kv_config()["kv_connector_extra_config"]["transport_options"] == \
        {"backend": "rdma"}
    bases = [c.kv_config()["kv_connector_extra_config"]["base_port"] for c in (first, second)]
    first_ports = {p for rank in range(4) for p in kv_ports(bases[0], rank)}
    second_ports = {p for rank in range(4) for p in kv_ports(bases[1], rank)}
    assert not first_ports & second_ports


def test_tp_instances_take_tp_gpus_their_nics_and_tp_transport_ports_each() -> None:
    commands = dry_run(SCRIPT, "--role", "prefill", *NODE, "--nics", NICS, "--tp-prefill",
                       "4", "--tp-decode", "2")
    first, second = _serves(commands)
    assert [c.env["HIP_VISIBLE_DEVICES"] for c in (first, second)] == ["0,1,2,3", "4,5,6,7"]
    assert second.env["MORI_RDMA_DEVICES"] == "mlx5_4,mlx5_5,mlx5_6,mlx5_7"
    assert (first.flag("--data-parallel-size"), first.flag("--tensor-parallel-size")) == \
        ("1", "4")
    # TP rank t listens on port + t: instance k's fixed port leaves room for its 4 ranks
    options = [c.kv_config()["kv_connector_extra_config"]["transport_options"]
               for c in (first, second)]
    assert options == [{"backend": "rdma", "port": 21000}, {"backend": "rdma", "port": 21004}]
    assert [c.kv_config()["kv_connector_extra_config"]["base_port"]
            for c in (first, second)] == [20000, 20016]
    args = build_parser().parse_args(first.argv[1:])
    assert (args.tensor_parallel_size, args.data_parallel_size) == (4, 1)


def test_gpus_per_instance_groups_tp_engines_as_dp_ranks() -> None:
    commands = dry_run(SCRIPT, "--role", "decode", *NODE, "--nics", NICS, "--tp-decode", "2",
                       "--gpus-per-instance", "4")
    first, second = _serves(commands)
    assert second.env["HIP_VISIBLE_DEVICES"] == "4,5,6,7"
    assert (first.flag("--data-parallel-size"), first.flag("--tensor-parallel-size")) == \
        ("2", "2")
    assert "DP ranks 0-1 x TP ranks 0-1" in first.comment
    assert [c.kv_config()["kv_connector_extra_config"]["base_port"]
            for c in (first, second)] == [20000, 20032]


def test_proxy_counts_each_roles_instances_from_its_tp_size() -> None:
    proxy, = dry_run(SCRIPT, "--role", "proxy", "--prefill-nodes", "p1", "--decode-nodes",
                     "d1,d2", "--tp-prefill", "8", "--tp-decode", "2")
    args = parse_proxy_args(proxy.argv[1:])
    assert args.prefill == ["http://p1:8100"]
    assert args.decode == [f"http://{n}:{8100 + k}" for n in ("d1", "d2") for k in range(4)]


def test_nixl_selects_nics_through_ucx() -> None:
    commands = dry_run(SCRIPT, "--role", "prefill", *NODE, "--nics", NICS, "--transport",
                       "nixl", "--gid-index", "3", "--gpus-per-instance", "2")
    serve = _serves(commands)[1]
    assert serve.env["UCX_NET_DEVICES"] == "mlx5_2:1,mlx5_3:1"
    assert serve.env["UCX_IB_GID_INDEX"] == "3"
    assert "transport_options" not in serve.kv_config()["kv_connector_extra_config"]
    assert not any(key.startswith("MORI_") for key in serve.env)


def test_tcp_needs_no_nics_and_gets_fixed_transport_ports() -> None:
    commands = dry_run(SCRIPT, "--role", "prefill", *NODE, "--transport", "tcp",
                       "--gpus", "0,1", "--transport-base-port", "30000")
    serves = _serves(commands)
    assert len(serves) == 2
    options = serves[1].kv_config()["kv_connector_extra_config"]["transport_options"]
    assert build_options(TcpOptions, "tcp", options).port == 30001
    assert "NIC" not in serves[1].comment


def _fake_sysfs(tmp_path: Path, names: list[str]) -> Path:
    for name in names:
        (tmp_path / "ib" / name).mkdir(parents=True)
    return tmp_path / "ib"


def test_nics_auto_maps_gpu_i_to_the_ith_device_in_natural_order(tmp_path: Path) -> None:
    sysfs = _fake_sysfs(tmp_path, [f"mlx5_{i}" for i in range(12)])
    commands = dry_run(SCRIPT, "--role", "prefill", *NODE, "--nics", "auto", "--gpus",
                       "8,9,10,11", env=clean_env(DISAGG_IB_SYSFS=str(sysfs)))
    assert [c.env["MORI_RDMA_DEVICES"] for c in _serves(commands)] == \
        ["mlx5_8", "mlx5_9", "mlx5_10", "mlx5_11"]
    assert [c.env["HIP_VISIBLE_DEVICES"] for c in _serves(commands)] == ["8", "9", "10", "11"]


def test_nics_auto_without_devices_is_a_clear_error(tmp_path: Path) -> None:
    sysfs = _fake_sysfs(tmp_path, ["mlx5_0"])
    env = clean_env(DISAGG_IB_SYSFS=str(sysfs))
    assert "GPU 1 has no NIC" in usage_error(SCRIPT, "--role", "prefill", *NODE, "--nics",
                                             "auto", env=env)
    env = clean_env(DISAGG_IB_SYSFS=str(tmp_path / "missing"))
    assert "found no RDMA devices" in usage_error(SCRIPT, "--role", "prefill", *NODE,
                                                  "--nics", "auto", env=env)


def _stub(bin_dir: Path, name: str, output: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize(("extra", "tool", "output", "expected"), [
    ((), "hostname", "192.0.2.7 10.9.9.9", "192.0.2.7"),
    (("--socket-ifname", "ens5"), "ip",
     "2: ens5    inet 198.51.100.4/24 brd 198.51.100.255 scope global ens5", "198.51.100.4"),
])
def test_node_ip_auto_reads_this_nodes_address(tmp_path: Path, extra: tuple[str, ...],
                                               tool: str, output: str, expected: str) -> None:
    _stub(tmp_path / "bin", tool, output)
    env = clean_env(PATH=f"{tmp_path / 'bin'}:{clean_env()['PATH']}")
    commands = dry_run(SCRIPT, "--role", "prefill", "--model", "m", "--node-ip", "auto",
                       "--transport", "tcp", *extra, env=env)
    assert {c.kv_config()["kv_connector_extra_config"]["host"] for c in _serves(commands)} \
        == {expected}


def test_proxy_role_lists_every_instance_of_every_node() -> None:
    commands = dry_run(SCRIPT, "--role", "proxy", "--prefill-nodes", "p1,p2",
                       "--decode-nodes", "d1", "--gpus-per-instance", "2", "--mode", "write",
                       "--proxy-port", "9000")
    proxy, = commands
    args = parse_proxy_args(proxy.argv[1:])
    assert args.prefill == [f"http://{n}:{8100 + k}" for n in ("p1", "p2") for k in range(4)]
    assert args.decode == [f"http://d1:{8100 + k}" for k in range(4)]
    assert (args.mode, args.port) == ("write", 9000)


@pytest.mark.parametrize(("args", "message"), [
    ((), "--role is required"),
    (("--role", "router"), "--role must be one of"),
    (("--role", "prefill", "--node-ip", "1.2.3.4"), "--model is required"),
    (("--role", "prefill", "--model", "m"), "--node-ip is required"),
    (("--role", "prefill", *NODE), "--nics is required for --transport mori"),
    (("--role", "prefill", *NODE, "--nics", "mlx5_0,mlx5_1"), "names 2 devices for 8 GPUs"),
    (("--role", "prefill", *NODE, "--nics", NICS, "--gpus-per-instance", "3"),
     "do not split evenly"),
    (("--role", "prefill", *NODE, "--nics", NICS, "--gpus-per-instance", "2", "--mode",
      "write"), "--mode write needs --gpus-per-instance 1"),
    (("--role", "prefill", *NODE, "--nics", NICS, "--transport-base-port", "20016"),
     "is wanted by both"),
    (("--role", "prefill", *NODE, "--transport", "ipc"), "--transport must be one of"),
    (("--role", "prefill", *NODE, "--nics", NICS, "--tp-prefill", "16"),
     "a prefill instance needs 16 GPUs (dp 1 x tp 16); --gpus lists 8"),
    (("--role", "decode", *NODE, "--nics", NICS, "--gpus", "0,1,2", "--tp-decode", "2"),
     "3 GPUs do not split evenly into instances of 2"),
    (("--role", "decode", *NODE, "--nics", NICS, "--tp-decode", "4", "--gpus-per-instance",
      "2"), "--gpus-per-instance 2 is not a multiple of --tp-decode 4"),
    (("--role", "prefill", *NODE, "--nics", NICS, "--tp-prefill", "2", "--gpus-per-instance",
      "4", "--mode", "write"), "--mode write needs --gpus-per-instance 2 on prefill nodes"),
    (("--role", "proxy", "--prefill-nodes", "a", "--decode-nodes", "b", "--tp-decode", "99"),
     "--tp-decode must be between 1 and 64"),
    (("--role", "prefill", *NODE, "--nics", NICS, "--gid-index", "x"), "--gid-index must be"),
    (("--role", "proxy", "--prefill-nodes", "a"), "--decode-nodes is required"),
    (("--role", "proxy", "--prefill-nodes", "a,a", "--decode-nodes", "b"), "lists 'a' twice"),
])
def test_bad_arguments_are_one_line_usage_errors(args: tuple[str, ...], message: str) -> None:
    assert message in usage_error(SCRIPT, *args)
