"""deploy/mi300x/slurm_xpyd.sh --dry-run: node roles, one srun step per node, the proxy step,
and what reaches multi_node.sh."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from deploy_plan import (
    DEPLOY_DIR,
    REPO_ROOT,
    Command,
    clean_env,
    dry_run,
    run_script,
    usage_error,
)

SCRIPT = "slurm_xpyd.sh"
NICS = ",".join(f"mlx5_{i}" for i in range(8))
BASE = ("--model", "/models/llama", "--nics", NICS)


def _steps(commands: list[Command]) -> list[Command]:
    assert all(c.program == "srun" for c in commands)
    return commands


def _script_args(step: Command) -> list[str]:
    """What the step runs after ``bash .../multi_node.sh``."""
    index = step.argv.index("bash")
    return step.argv[index + 2:]


def test_first_nodes_prefill_next_decode_and_the_proxy_steps_onto_the_first() -> None:
    commands = _steps(dry_run(SCRIPT, "--nodes", "n1,n2,n3,n4", "--num-prefill-nodes", "1",
                              "--num-decode-nodes", "2", *BASE, "--gid-index", "3"))
    p1, d1, d2, proxy = commands
    assert [c.flag("--role") for c in commands] == ["prefill", "decode", "decode", "proxy"]
    assert [c.argv[3] for c in commands] == ["--nodelist=n1", "--nodelist=n2",
                                             "--nodelist=n3", "--nodelist=n1"]
    for step in (p1, d1, d2):
        assert step.argv[:5] == ["srun", "--nodes=1", "--ntasks=1", step.argv[3],
                                 "--gpus-per-node=8"]
        assert step.argv[5:7] == ["bash", str(DEPLOY_DIR / "multi_node.sh")]
        assert _script_args(step)[2:] == ["--node-ip", "auto", *BASE, "--gid-index", "3"]
    assert "--overlap" in proxy.argv and "--gpus-per-node=8" not in proxy.argv
    assert proxy.flag("--prefill-nodes") == "n1" and proxy.flag("--decode-nodes") == "n2,n3"
    assert "n4" not in " ".join(c.argv[3] for c in commands)


def test_layout_options_reach_both_the_nodes_and_the_proxy() -> None:
    commands = dry_run(SCRIPT, "--nodes", "a,b", "--num-prefill-nodes", "1",
                       "--num-decode-nodes", "1", *BASE, "--gpus-per-instance", "4",
                       "--policy", "round_robin", "--http-base-port", "9100",
                       "--proxy-port", "7000", "--transfer-timeout", "20")
    prefill, decode, proxy = commands
    for step in (prefill, decode):
        args = _script_args(step)
        assert args[args.index("--gpus-per-instance") + 1] == "4"
        assert args[args.index("--transfer-timeout") + 1] == "20"
    assert proxy.flag("--gpus-per-instance") == "4" and proxy.flag("--policy") == "round_robin"
    assert proxy.flag("--http-base-port") == "9100" and proxy.flag("--proxy-port") == "7000"


def test_tp_sizes_reach_every_node_and_the_proxy_counts_instances_by_them() -> None:
    commands = dry_run(SCRIPT, "--nodes", "a,b,c", "--num-prefill-nodes", "1",
                       "--num-decode-nodes", "2", *BASE, "--tp-prefill", "4",
                       "--tp-decode", "2")
    prefill, d1, d2, proxy = commands
    for step in (prefill, d1, d2):
        args = _script_args(step)
        assert args[args.index("--tp-prefill") + 1] == "4"
        assert args[args.index("--tp-decode") + 1] == "2"
    assert (proxy.flag("--tp-prefill"), proxy.flag("--tp-decode")) == ("4", "2")
    assert "--gpus-per-instance" not in proxy.argv
    # the launcher waits on each node's instances: 2 per prefill node, 4 per decode node
    proc = run_script(SCRIPT, "--nodes", "a,b,c", "--num-prefill-nodes", "1",
                      "--num-decode-nodes", "2", *BASE, "--tp-prefill", "4", "--tp-decode",
                      "2", "--dry-run")
    waits = [line.split()[3] for line in proc.stdout.splitlines()
             if line.startswith("# wait until")]
    assert waits == ["http://a:8100/health", "http://a:8101/health",
                     *[f"http://{n}:{8100 + k}/health" for n in "bc" for k in range(4)]]


def test_write_mode_errors_of_multi_node_surface_before_any_step() -> None:
    message = usage_error(SCRIPT, "--nodes", "a,b", "--num-prefill-nodes", "1",
                          "--num-decode-nodes", "1", *BASE, "--gpus-per-instance", "2",
                          "--mode", "write")
    assert message.startswith("for the prefill nodes: --mode write needs")


def test_container_image_runs_the_scripts_inside_the_image() -> None:
    commands = dry_run(SCRIPT, "--nodes", "a,b", "--num-prefill-nodes", "1",
                       "--num-decode-nodes", "1", *BASE, "--container-image",
                       "registry.local/disagg:mi300x", "--container-mounts", "/models:/models")
    for step in commands:
        assert "--container-image=registry.local/disagg:mi300x" in step.argv
        assert "--container-mounts=/models:/models" in step.argv
        assert "/opt/disagg/deploy/mi300x/multi_node.sh" in step.argv


def _scontrol(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"
    stub.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[01-03]" ] && '
                    'printf "gpu01\\ngpu02\\ngpu03\\n"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return clean_env(PATH=f"{bin_dir}:{clean_env()['PATH']}", SLURM_JOB_ID="4242",
                     SLURM_JOB_NODELIST="gpu[01-03]", SLURM_SUBMIT_DIR=str(REPO_ROOT))


def test_inside_a_job_nodes_come_from_scontrol_and_scripts_from_the_submit_dir(
        tmp_path: Path) -> None:
    commands = dry_run(SCRIPT, "--num-prefill-nodes", "2", "--num-decode-nodes", "1", *BASE,
                       env=_scontrol(tmp_path))
    assert [c.argv[3] for c in commands] == ["--nodelist=gpu01", "--nodelist=gpu02",
                                             "--nodelist=gpu03", "--nodelist=gpu01"]
    assert commands[0].argv[6] == str(REPO_ROOT / "deploy" / "mi300x" / "multi_node.sh")


@pytest.mark.parametrize(("args", "message"), [
    (("--nodes", "a,b", "--num-decode-nodes", "1", *BASE), "--num-prefill-nodes is required"),
    (("--num-prefill-nodes", "1", "--num-decode-nodes", "1", *BASE),
     "--nodes is required outside a Slurm job"),
    (("--nodes", "a", "--num-prefill-nodes", "1", "--num-decode-nodes", "1", *BASE),
     "need 2 nodes; the job has 1"),
    (("--nodes", "a,b", "--num-prefill-nodes", "1", "--num-decode-nodes", "1",
      "--model", "m"), "for the prefill nodes: --nics is required"),
    (("--nodes", "a,b", "--num-prefill-nodes", "1", "--num-decode-nodes", "1", *BASE,
      "--proxy-port", "8103"), "port 8103 is wanted by both proxy and the instances' HTTP"),
    (("--nodes", "a,b", "--num-prefill-nodes", "1", "--num-decode-nodes", "1", *BASE,
      "--node-ip", "1.2.3.4"), "--node-ip is set per node by this script"),
    (("--nodes", "a,b", "--num-prefill-nodes", "1", "--num-decode-nodes", "1", *BASE,
      "--tp-decode", "16"),
     "for the decode nodes: a decode instance needs 16 GPUs (dp 1 x tp 16); --gpus lists 8"),
])
def test_bad_arguments_are_one_line_usage_errors(args: tuple[str, ...], message: str) -> None:
    assert message in usage_error(SCRIPT, *args)


def test_sbatch_header_asks_for_whole_gpu_nodes() -> None:
    header = [line for line in (DEPLOY_DIR / SCRIPT).read_text().splitlines()
              if line.startswith("#SBATCH")]
    assert "#SBATCH --exclusive" in header
    assert "#SBATCH --gpus-per-node=8" in header
    assert "#SBATCH --ntasks-per-node=1" in header
