"""deploy/mi300x/container.sh --dry-run and the Dockerfile it builds: ROCm device flags, RDMA
pass-through, and an install that keeps the base image's torch."""

from __future__ import annotations

import re

import pytest
from deploy_plan import DEPLOY_DIR, REPO_ROOT, dry_run, usage_error

SCRIPT = "container.sh"
DOCKERFILE = DEPLOY_DIR / "Dockerfile"
ROCM_FLAGS = ["--device=/dev/kfd", "--device=/dev/dri", "--group-add", "video"]


def test_build_uses_the_deploy_dockerfile_on_the_repository() -> None:
    build, = dry_run(SCRIPT, "build")
    assert build.argv == ["docker", "build", "-f", str(DOCKERFILE), "-t", "disagg:mi300x",
                          str(REPO_ROOT)]
    build, = dry_run(SCRIPT, "build", "--base-image", "rocm/pytorch:pinned", "--image", "x:1")
    assert build.flag("--build-arg") == "BASE_IMAGE=rocm/pytorch:pinned"
    assert build.flag("-t") == "x:1"


def test_run_passes_gpus_rdma_and_unlimited_memlock() -> None:
    run, = dry_run(SCRIPT, "run")
    argv = run.argv
    assert argv[:3] == ["docker", "run", "--rm"]
    for flag in ROCM_FLAGS:
        assert flag in argv
    assert {"--network=host", "--ipc=host", "--device=/dev/infiniband",
            "--cap-add=IPC_LOCK"} <= set(argv)
    assert run.flag("--ulimit") == "memlock=-1:-1"
    assert argv[-3:] == ["disagg:mi300x", "disagg", "doctor"]


def test_run_without_rdma_with_models_and_a_command() -> None:
    run, = dry_run(SCRIPT, "run", "--no-rdma", "--models", "/data/models", "--",
                   "bash", "deploy/mi300x/single_node.sh", "--model", "/data/models/m")
    assert "--device=/dev/infiniband" not in run.argv and "--ulimit" not in run.argv
    assert run.flag("-v") == "/data/models:/data/models:ro"
    assert run.argv[-5:] == ["disagg:mi300x", "bash", "deploy/mi300x/single_node.sh",
                             "--model", "/data/models/m"]


@pytest.mark.parametrize(("args", "message"), [
    (("deploy",), "unknown action 'deploy'"),
    (("run", "--shm-size", "lots"), "--shm-size must look like 16g"),
    (("run", "--"), "nothing after --"),
    (("build", "--image", "a b"), "--image must be a plain word"),
])
def test_bad_arguments_are_one_line_usage_errors(args: tuple[str, ...], message: str) -> None:
    assert message in usage_error(SCRIPT, *args)


def _run_steps() -> str:
    return " ".join(line for line in DOCKERFILE.read_text().splitlines()
                    if not line.lstrip().startswith("#"))


def test_dockerfile_starts_from_a_rocm_pytorch_image() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=rocm/pytorch:\S+$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert "torch.version.hip" in text  # refuses a base whose torch is not a ROCm build


def test_dockerfile_never_installs_or_replaces_torch() -> None:
    steps = _run_steps()
    assert not re.search(r"pip3? install[^&]*(?<![\w/-])torch(?![\w.-])", steps)
    assert not re.search(r"--upgrade|--force-reinstall|\[triton\]", steps)
    # the image's torch/triton become constraints, and a changed version fails the build
    assert "--constraint /tmp/base-torch.txt ." in steps
    assert "| diff /tmp/base-torch.txt -" in steps
    assert "--no-deps deploy/mi300x/wheels/*.whl" in steps


def test_every_path_the_dockerfile_copies_exists() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                if not source.endswith("*"):  # README.md* may be absent
                    assert (REPO_ROOT / source).exists(), source


def test_dockerfile_ignore_keeps_the_venv_and_git_out_of_the_context() -> None:
    ignored = (DEPLOY_DIR / "Dockerfile.dockerignore").read_text().splitlines()
    assert ".venv" in ignored and ".git" in ignored
