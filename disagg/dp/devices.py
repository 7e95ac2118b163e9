"""One GPU per data-parallel rank: the environment each engine-core process starts with.

    user's HIP/CUDA_VISIBLE_DEVICES = "4,5,6,7"   (or unset: every GPU torch sees)
    rank 0 -> "4", rank 1 -> "5", ...              the engine then uses its only GPU, cuda:0

The variable is set in the frontend around the spawn, so it is in place before the child
imports torch (the device list is read once, at the child's first CUDA call).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from disagg.common import platform
from disagg.common.config import ConfigError


def rank_device_env(rank: int, dp_size: int, device: str, tp_size: int = 1) -> dict[str, str]:
    """The variables that give ``rank`` its own ``tp_size`` GPUs (DP rank d, TP rank t ->
    visible GPU d * tp_size + t); empty on CPU or with one rank of one GPU."""
    if dp_size * tp_size == 1 or device == "cpu":
        return {}

    plat = platform.current_platform()
    if plat.device_count == 0:
        if device == "cuda":
            raise ConfigError("--device cuda but torch sees no GPU")
        return {}
    var = platform.visible_devices_env()
    current = os.environ.get(var, "").strip()
    ids = [d.strip() for d in current.split(",") if d.strip()] if current \
        else [str(i) for i in range(plat.device_count)]
    need = dp_size * tp_size
    if len(ids) < need:
        raise ConfigError(f"--data-parallel-size {dp_size} x --tensor-parallel-size {tp_size} "
                          f"needs {need} GPUs, but only {len(ids)} are visible "
                          f"({var}={current or 'unset'}); lower the sizes or make more GPUs "
                          "visible")
    return {var: ",".join(ids[rank * tp_size:(rank + 1) * tp_size])}


@contextlib.contextmanager
def child_env(env: dict[str, str]) -> Iterator[None]:
    """Set variables for a child about to be spawned, and restore ours afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpu_threads_per_rank(dp_size: int, device: str, tp_size: int = 1) -> int | None:
    """CPU ranks share the cores: each gets its slice, or their OpenMP pools spin against each
    other (3 ranks on 2 cores ran 25x slower). None: leave torch's default (one rank, a GPU,
    or the user chose OMP_NUM_THREADS)."""
    if dp_size * tp_size == 1 or device not in ("cpu", "auto") or \
            os.environ.get("OMP_NUM_THREADS"):
        return None
    if device == "auto" and platform.is_gpu():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // (dp_size * tp_size))
