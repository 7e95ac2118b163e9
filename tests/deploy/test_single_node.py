"""deploy/mi300x/single_node.sh --dry-run: GPU assignment, ports, environment, and commands
that the real ``disagg serve`` and ``disagg-proxy`` parsers accept."""

from __future__ import annotations

import pytest
from deploy_plan import Command, clean_env, dry_run, run_script, usage_error

from connectors.protocol import kv_ports
from connectors.transports.mori import MoriOptions
from connectors.transports.validation import build_options
from disagg.cli import build_parser, engine_config_from_args
from proxy.launcher import parse_args as parse_proxy_args

SCRIPT = "single_node.sh"
ROCM_KNOBS = {"HIP_FORCE_DEV_KERNARG": "1", "TORCH_BLAS_PREFER_HIPBLASLT": "1"}


def _by_program(commands: list[Command], program: str, sub: str | None = None) -> list[Command]:
    return [c for c in commands if c.program == program and (sub is None or c.argv[1] == sub)]


def test_default_is_one_prefill_on_gpus_0_3_and_one_decode_on_4_7_over_ipc() -> None:
    commands = dry_run(SCRIPT, "--model", "/models/llama")
    doctor, = _by_program(commands, "disagg", "doctor")
    prefill, decode = _by_program(commands, "disagg", "serve")
    proxy, = _by_program(commands, "disagg-proxy")
    assert [c.program for c in commands] == ["disagg", "disagg", "disagg", "disagg-proxy"]
    assert doctor.argv == ["disagg", "doctor", "--no-compile", "--require", "ipc"]
    assert doctor.env == {"HIP_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    # own GPUs first (DP rank r -> device r), then the peer's, which ipc must be able to open
    assert prefill.env == {"HIP_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", **ROCM_KNOBS}
    assert decode.env == {"HIP_VISIBLE_DEVICES": "4,5,6,7,0,1,2,3", **ROCM_KNOBS}
    assert "GPUs 0,1,2,3 as DP ranks 0-3" in prefill.comment
    assert prefill.flag("--data-parallel-size") == decode.flag("--data-parallel-size") == "4"
    assert prefill.kv_config() == {
        "kv_connector": "PDConnector", "kv_role": "kv_producer",
        "kv_connector_extra_config": {"transport": "ipc", "mode": "read", "base_port": 20000,
                                      "host": "127.0.0.1"}}
    assert decode.kv_config()["kv_role"] == "kv_consumer"
    assert decode.kv_config()["kv_connector_extra_config"]["base_port"] == 20000 + 4 * 16
    assert proxy.flags("--prefill") == ["http://127.0.0.1:8100"]
    assert proxy.flags("--decode") == ["http://127.0.0.1:8101"]


def test_serve_lines_are_accepted_by_the_real_disagg_cli() -> None:
    commands = dry_run(SCRIPT, "--model", "builtin:tiny-llama", "--transfer-timeout", "12.5",
                       "--defer-timeout", "90", "--lease-timeout", "7",
                       "--kv-load-failure-policy", "recompute",
                       "--instance-arg=--max-num-seqs", "--instance-arg", "64")
    for serve in _by_program(commands, "disagg", "serve"):
        args = build_parser().parse_args(serve.argv[1:])
        cfg = engine_config_from_args(args)
        assert args.command == "serve" and args.host == "127.0.0.1"
        assert cfg.parallel.data_parallel_size == 4
        assert cfg.model.device == "cuda"
        assert cfg.scheduler.max_num_seqs == 64
        assert cfg.kv_transfer is not None
        extra = cfg.kv_transfer.kv_connector_extra_config
        assert (extra["transfer_timeout"], extra["defer_timeout"], extra["lease_timeout"]) \
            == (12.5, 90, 7)
        assert extra["kv_load_failure_policy"] == "recompute"


def test_proxy_line_is_accepted_by_the_real_launcher_and_points_at_every_instance() -> None:
    commands = dry_run(SCRIPT, "--model", "m", "--num-prefill", "2", "--num-decode", "4",
                       "--mode", "read", "--policy", "power_of_two", "--proxy-port", "9000")
    proxy, = _by_program(commands, "disagg-proxy")
    args = parse_proxy_args(proxy.argv[1:])
    serves = _by_program(commands, "disagg", "serve")
    urls: dict[str, list[str]] = {"kv_producer": [], "kv_consumer": []}
    for c in serves:
        urls[c.kv_config()["kv_role"]].append(f"http://127.0.0.1:{c.flag('--port')}")
    assert args.prefill == urls["kv_producer"] and len(args.prefill) == 2
    assert args.decode == urls["kv_consumer"] and len(args.decode) == 4
    assert (args.port, args.mode, args.policy, args.host) == (9000, "read", "power_of_two",
                                                              "0.0.0.0")


def test_instances_split_gpus_evenly_and_every_dp_rank_port_is_private() -> None:
    commands = dry_run(SCRIPT, "--model", "m", "--prefill-gpus", "0,1", "--decode-gpus",
                       "2,3,4,5,6,7", "--num-prefill", "2", "--num-decode", "3")
    serves = _by_program(commands, "disagg", "serve")
    own = [c.env["HIP_VISIBLE_DEVICES"].split(",")[:int(c.flag("--data-parallel-size"))]
           for c in serves]
    assert own == [["0"], ["1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert all(sorted(c.env["HIP_VISIBLE_DEVICES"].split(",")) == list("01234567")
               for c in serves)
    used: set[int] = set()
    for c in serves:
        base = c.kv_config()["kv_connector_extra_config"]["base_port"]
        ports = {p for rank in range(int(c.flag("--data-parallel-size")))
                 for p in kv_ports(base, rank)}
        assert not ports & used, "two engines would bind one control port"
        used |= ports
    http_ports = [int(c.flag("--port")) for c in serves]
    assert http_ports == [8100, 8101, 8102, 8103, 8104]
    assert not set(http_ports) & used


def test_mixed_tp_gives_each_instance_dp_x_tp_gpus_of_its_own() -> None:
    commands = dry_run(SCRIPT, "--model", "builtin:tiny-llama", "--prefill-gpus", "0,1,2,3",
                       "--decode-gpus", "4,5,6,7", "--num-decode", "2", "--tp-prefill", "4",
                       "--tp-decode", "2", "--transport", "tcp")
    prefill, d0, d1 = _by_program(commands, "disagg", "serve")
    assert [c.env["HIP_VISIBLE_DEVICES"] for c in (prefill, d0, d1)] == ["0,1,2,3", "4,5",
                                                                        "6,7"]
    assert [(c.flag("--data-parallel-size"), c.flag("--tensor-parallel-size"))
            for c in (prefill, d0, d1)] == [("1", "4"), ("1", "2"), ("1", "2")]
    assert "GPUs 0,1,2,3 as TP ranks 0-3 of one engine core" in prefill.comment
    # one engine core each: 16 control ports per instance, not per GPU
    assert [c.kv_config()["kv_connector_extra_config"]["base_port"]
            for c in (prefill, d0, d1)] == [20000, 20016, 20032]
    for serve in (prefill, d0, d1):
        cfg = engine_config_from_args(build_parser().parse_args(serve.argv[1:]))
        assert cfg.parallel.tensor_parallel_size == int(serve.flag("--tensor-parallel-size"))


def test_dp_and_tp_together_keep_own_gpus_first_for_ipc() -> None:
    commands = dry_run(SCRIPT, "--model", "m", "--tp-decode", "2")
    prefill, decode = _by_program(commands, "disagg", "serve")
    assert (prefill.flag("--data-parallel-size"), prefill.flag("--tensor-parallel-size")) == \
        ("4", "1")
    assert (decode.flag("--data-parallel-size"), decode.flag("--tensor-parallel-size")) == \
        ("2", "2")
    # DP rank d / TP rank t takes visible device d*2+t: the decode's own four GPUs come first
    assert decode.env["HIP_VISIBLE_DEVICES"] == "4,5,6,7,0,1,2,3"
    assert "DP ranks 0-1 x TP ranks 0-1 on HIP devices 0-3" in decode.comment
    plan = run_script(SCRIPT, "--model", "m", "--tp-decode", "2", "--dry-run").stdout
    assert "1 prefill x 4 GPU(s) at tp 1, 1 decode x 4 GPU(s) at tp 2" in plan


def test_tcp_transport_keeps_each_instance_on_its_own_gpus() -> None:
    commands = dry_run(SCRIPT, "--model", "m", "--transport", "tcp")
    prefill, decode = _by_program(commands, "disagg", "serve")
    assert prefill.env["HIP_VISIBLE_DEVICES"] == "0,1,2,3"
    assert decode.env["HIP_VISIBLE_DEVICES"] == "4,5,6,7"


def test_mori_on_one_node_uses_its_xgmi_backend_with_valid_options() -> None:
    commands = dry_run(SCRIPT, "--model", "m", "--transport", "mori")
    for serve in _by_program(commands, "disagg", "serve"):
        options = serve.kv_config()["kv_connector_extra_config"]["transport_options"]
        assert options == {"backend": "xgmi"}
        assert build_options(MoriOptions, "mori", options).backend == "xgmi"


def test_write_mode_with_one_gpu_per_prefill_instance() -> None:
    commands = dry_run(SCRIPT, "--model", "m", "--mode", "write", "--num-prefill", "4",
                       "--num-decode", "4")
    proxy, = _by_program(commands, "disagg-proxy")
    assert proxy.flag("--mode") == "write"
    assert {c.kv_config()["kv_connector_extra_config"]["mode"]
            for c in _by_program(commands, "disagg", "serve")} == {"write"}


def test_output_is_deterministic_and_the_callers_rocm_knobs_win() -> None:
    first = run_script(SCRIPT, "--model", "m", "--dry-run")
    assert first.stdout == run_script(SCRIPT, "--model", "m", "--dry-run").stdout
    commands = dry_run(SCRIPT, "--model", "m", env=clean_env(HIP_FORCE_DEV_KERNARG="0"))
    assert _by_program(commands, "disagg", "serve")[0].env["HIP_FORCE_DEV_KERNARG"] == "0"


@pytest.mark.parametrize(("args", "message"), [
    ((), "--model is required"),
    (("--model", "m", "--prefill-gpus", "0,1,1"), "--prefill-gpus lists '1' twice"),
    (("--model", "m", "--decode-gpus", "3,4"), "GPU 3 is in both"),
    (("--model", "m", "--prefill-gpus", "0,x"), "must list GPU indices"),
    (("--model", "m", "--num-prefill", "3"), "do not split evenly into 3 instances"),
    (("--model", "m", "--mode", "write"),
     "--mode write needs one engine core per prefill instance"),
    (("--model", "m", "--mode", "write", "--tp-prefill", "2"), "use --num-prefill 2"),
    (("--model", "m", "--mode", "write", "--num-prefill", "4"),
     "--mode write needs one engine core per decode instance"),
    (("--model", "m", "--tp-prefill", "8"),
     "1 prefill instance(s) x tp 8 need 8 GPUs; --prefill-gpus lists 4"),
    (("--model", "m", "--num-decode", "2", "--tp-decode", "4"),
     "2 decode instance(s) x tp 4 need 8 GPUs; --decode-gpus lists 4"),
    (("--model", "m", "--tp-prefill", "3"),
     "4 GPUs per prefill instance do not split into TP groups of --tp-prefill 3"),
    (("--model", "m", "--tp-decode", "65"), "--tp-decode must be between 1 and 64"),
    (("--model", "m", "--tp-decode", "0"), "--tp-decode must be at least 1"),
    (("--model", "m", "--transport", "rdma"), "--transport must be one of"),
    (("--model", "m", "--proxy-port", "8100"), "port 8100 is wanted by both proxy"),
    (("--model", "m", "--http-base-port", "20000"), "port 20000 is wanted by both"),
    (("--model", "m", "--kv-base-port", "65500"), "past 65535"),
    (("--model", "m", "--transfer-timeout", "0"), "positive number of seconds"),
    (("--model", "m", "--transfer-timeout", "07"), "positive number of seconds"),
    (("--model", "m", "--proxy-port", "08000"), "must be a whole number"),
    (("--model", "m", "--kv-load-failure-policy", "retry"), "fail recompute"),
    (("--model", "a b"), "--model must be a plain word"),
    (("--model", "m", "--bogus", "1"), "unknown option '--bogus'"),
    (("--model",), "--model needs a value"),
    (("--mode", "--model", "m"), "--mode needs a value, got the option '--model'"),
])
def test_bad_arguments_are_one_line_usage_errors(args: tuple[str, ...], message: str) -> None:
    assert message in usage_error(SCRIPT, *args)


def test_help_lists_every_option() -> None:
    proc = run_script(SCRIPT, "--help")
    assert proc.returncode == 0
    for flag in ("--prefill-gpus", "--tp-prefill", "--tp-decode", "--transport",
                 "--kv-base-port", "--transfer-timeout",
                 "--instance-arg", "--dry-run"):
        assert flag in proc.stdout
