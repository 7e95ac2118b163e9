"""Network-namespace helpers shared by the tests that make two "hosts" on one machine."""

from __future__ import annotations

import os
import shutil
import subprocess

IP_TIMEOUT_S = 20.0


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` under a deadline; the caller checks the return code."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)


def netns_unavailable(tag: str) -> str | None:
    """Why namespaces cannot be made here, or None when they can (probes with one named TAG)."""
    if shutil.which("ip") is None:
        return "the `ip` command is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"{tag}{os.getpid() % 100000}"
    result = ip("netns", "add", probe)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    ip("netns", "del", probe)
    return None
