"""Run metadata for every result row: commit, hardware, versions, deployment."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
_SUBPROCESS_TIMEOUT_S = 5.0


def _run_quiet(cmd: list[str], cwd: Path | None = None) -> str | None:
    """stdout of a short helper command, or None when it is missing, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              timeout=_SUBPROCESS_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout this package runs from, if it is one."""
    return _run_quiet(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT)


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_names() -> list[str]:
    """GPU names from nvidia-smi or rocm-smi, without touching torch (no device context)."""
    out = _run_quiet(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    if out:
        return [line.strip() for line in out.splitlines() if line.strip()]
    out = _run_quiet(["rocm-smi", "--showproductname"])
    if out:
        return [line.split(":")[-1].strip() for line in out.splitlines()
                if "Card Series" in line or "Card series" in line]
    return []


@functools.lru_cache(maxsize=1)
def hardware_info() -> dict[str, Any]:
    """CPU model and cores, GPU name and count (of the machine this process runs on)."""
    gpus = _gpu_names()
    info: dict[str, Any] = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count() or 0,
                            "gpu": gpus[0] if gpus else None, "num_gpus": len(gpus)}
    info["summary"] = hardware_summary(info)
    return info


def hardware_summary(info: dict[str, Any]) -> str:
    """One short line: ``8x AMD Instinct MI300X`` or ``Intel Xeon ... (2 cores)``."""
    if info.get("gpu"):
        return f"{info.get('num_gpus') or 1}x {info['gpu']}"
    cores = info.get("cpu_cores", info.get("num_cpus", "?"))
    return f"{info.get('cpu', 'cpu')} ({cores} cores)"


def _version(dist: str) -> str | None:
    """Installed version of a distribution, without importing it."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """python, torch, disagg and the HTTP client's versions."""
    from disagg.common.version import __version__ as disagg_version

    return {"python": platform.python_version(), "torch": _version("torch"),
            "disagg": disagg_version, "aiohttp": _version("aiohttp")}


def run_metadata(deployment: str | None = None, hardware: str | None = None) -> dict[str, Any]:
    """The metadata block of a result; ``hardware`` overrides the detected summary line."""
    hw = dict(hardware_info())
    if hardware:
        hw["summary"] = hardware
    return {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "commit": git_commit(),
            "hardware": hw, "versions": versions(), "deployment": deployment}
