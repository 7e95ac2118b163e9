"""Per-architecture launch configurations, kept as data, and the launch spec they resolve to.

    hip_kernels/configs/
        default/<kernel>.json   every key a kernel reads, with portable values
        gfx942/<kernel>.json    MI300X overrides (wavefront 64, 304 CUs)
        gfx950/<kernel>.json    MI355X overrides (wavefront 64, 256 CUs)
        sm_90/<kernel>.json     H100/H200 overrides (warp 32, 132 SMs)

An arch file holds only the keys it changes; a key not in the default file is an error, so a
typo cannot silently fall back. Values are ints or lists of ``[upper_bound, value]`` pairs
(see ``bucket``); keys starting with ``_`` are notes (where a number came from) and are
dropped. Autotuning is off: the numbers here are what runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disagg.common import platform

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_ARCH = "default"
KNOWN_ARCHS = ("gfx942", "gfx950", "sm_90")

ConfigValue = int | list[list[int]]


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """One concrete compilation of a kernel: what ``triton.compile`` needs, without a GPU."""

    name: str
    """Readable case name, e.g. ``paged_decode_attention[bf16,g4,d128]``."""
    fn: Any
    """The ``@triton.jit`` function."""
    signature: dict[str, str]
    """Every parameter in order: ``*bf16``, ``i32``, ``fp32``, ... or ``constexpr``."""
    constexprs: dict[str, Any]
    aligned: tuple[str, ...] = ()
    """Integer parameters known to be multiples of 16 at this shape (pointers always are)."""
    num_warps: int = 4
    num_stages: int = 1
    launch: dict[str, Any] = field(default_factory=dict)
    """Free-form facts for reports (grid, shapes); not used to compile."""


def current_arch() -> str | None:
    """The running GPU's arch (``gfx942``, ``sm_90``), None on CPU."""

    return platform.current_platform().arch


def arch_for_target(target: str) -> str:
    """Config arch for an AOT target: ``hip:gfx942`` -> ``gfx942``, ``cuda:90`` -> ``sm_90``."""
    backend, _, arch = target.partition(":")
    if backend == "hip":
        return arch
    if backend == "cuda":
        return f"sm_{arch}"
    raise ValueError(f"unknown target {target!r}: expected hip:<gfx arch> or cuda:<capability>")


@functools.cache
def _read(arch: str, kernel: str) -> dict[str, ConfigValue]:
    """One JSON file, or {} when this arch has no overrides for this kernel."""
    path = CONFIG_DIR / arch / f"{kernel}.json"
    if not path.exists():
        if arch == DEFAULT_ARCH:
            raise FileNotFoundError(f"no default launch config for kernel {kernel!r} at {path}")
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return {key: value for key, value in data.items() if not key.startswith("_")}


OVERRIDE_ENV = "DISAGG_KERNEL_CONFIG"
"""JSON ``{"<kernel>": {"<key>": value}}`` applied over the files, for sweeps on a lent GPU
(e.g. ``DISAGG_KERNEL_CONFIG='{"kv_blocks": {"copy_block": 8192}}'``); keys must exist."""


@contextlib.contextmanager
def overridden(overrides: Mapping[str, Mapping[str, object]]) -> Iterator[None]:
    """Inside the block, ``overrides`` ({kernel: {key: value}}) stand in ``OVERRIDE_ENV`` (for
    tile sweeps and tests); whatever it held before is restored after, also on an error."""
    saved = os.environ.get(OVERRIDE_ENV)
    os.environ[OVERRIDE_ENV] = json.dumps(overrides)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(OVERRIDE_ENV, None)
        else:
            os.environ[OVERRIDE_ENV] = saved


def load_config(kernel: str, arch: str | None = None) -> dict[str, ConfigValue]:
    """Merged launch config of ``kernel`` for ``arch`` (default: the running GPU's arch)."""
    arch = arch if arch is not None else current_arch()
    merged = dict(_read(DEFAULT_ARCH, kernel))
    if arch and arch != DEFAULT_ARCH:
        _merge(merged, _read(arch, kernel), f"configs/{arch}/{kernel}.json")
    env = _env_overrides().get(kernel)
    if env:
        _merge(merged, env, f"{OVERRIDE_ENV}[{kernel!r}]")
    return merged


def _merge(merged: dict[str, ConfigValue], overrides: Mapping[str, ConfigValue],
           where: str) -> None:
    unknown = sorted(set(overrides) - set(merged))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(merged)}")
    merged.update(overrides)


def _env_overrides() -> dict[str, dict[str, ConfigValue]]:
    text = os.environ.get(OVERRIDE_ENV, "").strip()
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{OVERRIDE_ENV} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{OVERRIDE_ENV} must be a JSON object of objects, got {text!r}")
    return data


def get_int(config: Mapping[str, ConfigValue], key: str) -> int:
    """An int-valued key of a merged config."""
    value = config[key]
    if not isinstance(value, int):
        raise ValueError(f"launch config key {key!r} must be an int, got {value!r}")
    return value


def bucket(config: Mapping[str, ConfigValue], key: str, size: int) -> int:
    """Value of the first ``[upper_bound, value]`` pair with ``size <= upper_bound``.

    Sizes past the last bound take the last value.
    """
    pairs = config[key]
    if not isinstance(pairs, list) or not pairs:
        raise ValueError(f"launch config key {key!r} must be a list of [bound, value] pairs")
    for upper_bound, value in pairs:
        if size <= upper_bound:
            return int(value)
    return int(pairs[-1][1])
