"""Every shell script under deploy/ passes shellcheck (CI installs it; skipped without it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_plan import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"


def shell_scripts() -> list[Path]:
    """``*.sh`` files, plus any file whose first line is a bash shebang."""
    scripts = []
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        with path.open("rb") as f:
            first = f.readline()
        if path.suffix == ".sh" or first.startswith(b"#!") and b"bash" in first:
            scripts.append(path)
    return scripts


def test_deploy_has_the_scripts_the_docs_name() -> None:
    paths = {str(p.relative_to(DEPLOY)) for p in shell_scripts()}
    assert {f"mi300x/{name}" for name in ("lib.sh", "single_node.sh", "multi_node.sh",
                                          "slurm_xpyd.sh", "container.sh")} <= paths
    assert "cuda/single_node.sh" in paths


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install -y shellcheck)")
@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.name)
def test_shellcheck_is_clean(script: Path) -> None:
    proc = subprocess.run(["shellcheck", "-x", "--severity=style", str(script)],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_launch_scripts_are_executable() -> None:
    for script in shell_scripts():
        if script.name != "lib.sh":  # sourced, never run
            assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
