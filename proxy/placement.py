"""GPU placement of ``disagg-proxy --launch`` instances: each gets its own contiguous GPUs.

    visible GPUs 0..7; 1 prefill at --tp-prefill 4, 2 decode at --tp-decode 2:
      prefill-0 -> 0,1,2,3     decode-0 -> 4,5     decode-1 -> 6,7

An instance takes dp x tp GPUs (its ``--data-parallel-size`` from the instance arguments, its
role's TP size). Inside it, DP rank d / TP rank t runs on its (d * tp + t)-th visible GPU
(disagg/dp/devices.py), so every instance's visible-devices variable lists its own GPUs only,
in order. On CPU nothing is placed; the instances share the cores instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from disagg.common import platform
from proxy.supervisor import LaunchError

DP_FLAGS = ("--data-parallel-size", "-dp")
TP_FLAGS = ("--tensor-parallel-size", "-tp")
MAX_TP_SIZE = 64
"""The largest ``--tensor-parallel-size`` ``disagg serve`` accepts."""


def instance_flag(instance_args: Sequence[str], names: tuple[str, ...]) -> str | None:
    """The value of the last of ``names`` in the instance arguments (argparse keeps the last),
    as ``--flag V`` or ``--flag=V``; None when absent."""
    value = None
    args = list(instance_args)
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name not in names:
            continue
        if eq:
            value = inline
        elif i + 1 < len(args):
            value = args[i + 1]
    return value


def instance_dp_size(instance_args: Sequence[str]) -> int:
    """``--data-parallel-size`` given to every instance (1 when absent); ValueError if bad."""
    value = instance_flag(instance_args, DP_FLAGS)
    if value is None:
        return 1
    size = int(value)
    if size < 1:
        raise ValueError(f"--data-parallel-size must be at least 1, got {size}")
    return size


@dataclass(frozen=True, slots=True, kw_only=True)
class RoleShape:
    """The instances of one role and the GPUs each of them takes."""

    role: str
    """``prefill`` or ``decode``."""
    count: int
    dp_size: int
    tp_size: int
    num_gpus: int
    """GPUs per instance: dp_size x tp_size, or more when --gpus-per-instance says so."""

    @property
    def num_ranks(self) -> int:
        """Processes doing model work in all instances of this role (engine cores x TP)."""
        return self.count * self.dp_size * self.tp_size

    def describe(self) -> str:
        """``2 prefill x 4 GPUs (dp 2 x tp 2)``."""
        parts = [f"dp {self.dp_size}"] if self.dp_size > 1 else []
        parts += [f"tp {self.tp_size}"] if self.tp_size > 1 else []
        why = f" ({' x '.join(parts)})" if parts and self.num_gpus == self.dp_size * \
            self.tp_size else ""
        return f"{self.count} {self.role} x {self.num_gpus} GPU(s){why}"


def role_shape(role: str, count: int, dp_size: int, tp_size: int,
               gpus_per_instance: int | None) -> RoleShape:
    """One role's shape; LaunchError when ``gpus_per_instance`` cannot hold dp x tp ranks."""
    need = dp_size * tp_size
    if gpus_per_instance is not None and gpus_per_instance < need:
        raise LaunchError(f"--gpus-per-instance {gpus_per_instance} is fewer than the {need} "
                          f"GPUs a {role} instance needs (dp {dp_size} x tp {tp_size})")
    return RoleShape(role=role, count=count, dp_size=dp_size, tp_size=tp_size,
                     num_gpus=need if gpus_per_instance is None else gpus_per_instance)


def visible_gpus() -> tuple[str, list[str]]:
    """(the visible-devices variable, the GPU ids it selects: what we inherited, else every
    GPU torch sees)."""
    var = platform.visible_devices_env()
    inherited = os.environ.get(var, "").strip()
    if inherited:
        return var, [d.strip() for d in inherited.split(",") if d.strip()]
    return var, [str(i) for i in range(platform.current_platform().device_count)]


def place(shapes: Sequence[RoleShape]) -> list[list[str]]:
    """Disjoint, contiguous GPU ids per instance, in role order; LaunchError (one line naming
    the count needed) when too few are visible, raised before anything starts."""
    var, visible = visible_gpus()
    needed = sum(s.count * s.num_gpus for s in shapes)
    if needed > len(visible):
        shown = os.environ.get(var, "").strip() or "unset"
        raise LaunchError(f"{' + '.join(s.describe() for s in shapes)} need {needed} GPUs; "
                          f"{len(visible)} visible ({var}={shown}); lower --tp-prefill/"
                          "--tp-decode or the instance counts, or make more GPUs visible")
    groups: list[list[str]] = []
    start = 0
    for shape in shapes:
        for _ in range(shape.count):
            groups.append(visible[start:start + shape.num_gpus])
            start += shape.num_gpus
    return groups


def cpu_threads_env(shapes: Sequence[RoleShape]) -> dict[str, str]:
    """OMP_NUM_THREADS for CPU instances: every rank of every instance (TP workers too) gets
    its share of the cores, or their OpenMP pools fight; empty when the user chose it."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    ranks = max(1, sum(s.num_ranks for s in shapes))
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
