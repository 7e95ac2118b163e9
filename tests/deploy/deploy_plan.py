"""Run a deploy script and read its --dry-run plan back as commands.

A plan is text: ``# ...`` comment lines, and command lines a shell could run as they are,
``env VAR=VALUE ... program args`` (or ``program args``). ``parse_plan`` splits each command
line with shlex, so every quoting the scripts print is checked too.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy" / "mi300x"
CUDA_SINGLE_NODE = "../cuda/single_node.sh"
"""deploy/cuda/single_node.sh, named as the helpers below take a script: relative to DEPLOY_DIR."""
SCRIPT_TIMEOUT_S = 20


@dataclass
class Command:
    """One command line of a plan."""

    env: dict[str, str]
    argv: list[str]
    comment: str = ""
    """The comment line just above it, if any."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def program(self) -> str:
        """``disagg``, ``disagg-proxy``, ``srun``, ``docker`` ..."""
        return self.argv[0]

    def flag(self, name: str) -> str:
        """The value after ``name`` (the first one)."""
        return self.argv[self.argv.index(name) + 1]

    def flags(self, name: str) -> list[str]:
        """Every value given after ``name``."""
        return [self.argv[i + 1] for i, word in enumerate(self.argv) if word == name]

    def kv_config(self) -> dict[str, Any]:
        """The parsed ``--kv-transfer-config`` JSON."""
        result: dict[str, Any] = json.loads(self.flag("--kv-transfer-config"))
        return result


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment, so no knob of the caller's leaks into the plan."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    env.update(extra)
    return env


def run_script(script: str, *args: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """``bash deploy/mi300x/<script> args...`` (``script`` relative to that folder) with a
    clean environment."""
    return subprocess.run(["bash", str(DEPLOY_DIR / script), *args], capture_output=True,
                          text=True, timeout=SCRIPT_TIMEOUT_S, cwd=REPO_ROOT,
                          env=env if env is not None else clean_env())


def parse_plan(text: str) -> list[Command]:
    """The command lines of a plan, each with the comment line above it."""
    commands: list[Command] = []
    last_comment = ""
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            last_comment = line[1:].strip()
            continue
        words = shlex.split(line)
        env: dict[str, str] = {}
        if words[0] == "env":
            words = words[1:]
            while words and "=" in words[0] and not words[0].startswith("-"):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
        commands.append(Command(env=env, argv=words, comment=last_comment))
        last_comment = ""
    return commands


def with_dry_run(script: str, args: tuple[str, ...]) -> list[str]:
    """``args`` with --dry-run first (after container.sh's action), so nothing ever starts."""
    if script == "container.sh" and args:
        return [args[0], "--dry-run", *args[1:]]
    return ["--dry-run", *args]


def dry_run(script: str, *args: str, env: dict[str, str] | None = None) -> list[Command]:
    """Run with --dry-run, assert it succeeded quietly, return its commands."""
    proc = run_script(script, *with_dry_run(script, args), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return parse_plan(proc.stdout)


def usage_error(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run with --dry-run expecting a usage error; return its one stderr line."""
    proc = run_script(script, *with_dry_run(script, args), env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    prefix = f"{Path(script).name}: error: "
    assert lines[0].startswith(prefix)
    return lines[0].removeprefix(prefix)
