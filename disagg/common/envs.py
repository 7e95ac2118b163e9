"""Every environment variable disagg reads, in one typed place (prefix ``DISAGG_``)."""

from __future__ import annotations

import math
import os

from disagg.common.config import ConfigError, parse_bytes


def _get_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from exc


def _get_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def step_trace_file() -> str | None:
    """A file each engine core appends one JSON line to per model step (wall-clock start and
    end, tokens, requests): lines up the steps of co-located instances. Unset: no trace."""
    return os.environ.get("DISAGG_STEP_TRACE_FILE") or None


def torch_profile() -> tuple[str, int, int] | None:
    """``DISAGG_TORCH_PROFILE_DIR`` (and ``DISAGG_TORCH_PROFILE_STEPS=SKIP:COUNT``, default
    ``8:64``): each engine core writes a torch.profiler trace of model steps SKIP..SKIP+COUNT
    to that folder (disagg/engine/step_trace.py). Unset: no profiling."""
    out_dir = os.environ.get("DISAGG_TORCH_PROFILE_DIR") or None
    if out_dir is None:
        return None
    raw = os.environ.get("DISAGG_TORCH_PROFILE_STEPS") or "8:64"
    try:
        skip, count = (int(x) for x in raw.split(":"))
    except ValueError as exc:
        raise ValueError(f"DISAGG_TORCH_PROFILE_STEPS={raw!r}: expected SKIP:COUNT") from exc
    if skip < 0 or count < 1:
        raise ValueError(f"DISAGG_TORCH_PROFILE_STEPS={raw!r}: SKIP >= 0 and COUNT >= 1")
    return out_dir, skip, count


def engine_ready_timeout_s() -> float:
    """How long a frontend waits for every engine core's ready handshake."""
    return _get_float("DISAGG_ENGINE_READY_TIMEOUT_S", 300.0)


LOG_LEVEL_ENV = "DISAGG_LOG_LEVEL"
LOG_FORMAT_ENV = "DISAGG_LOG_FORMAT"
LOG_STATS_INTERVAL_ENV = "DISAGG_LOG_STATS_INTERVAL_S"


def log_level() -> str:
    """Root log level for disagg processes (``--log-level`` overrides it and exports it to the
    processes a command starts)."""
    return os.environ.get(LOG_LEVEL_ENV, "").strip().upper() or "INFO"


def log_format() -> str:
    """text | json (``--log-format`` overrides it and exports it, like the level)."""
    return os.environ.get(LOG_FORMAT_ENV, "").strip().lower() or "text"


def log_stats_interval_s() -> float:
    """Seconds between two periodic stats lines (instances and the proxy; vLLM's is 10 s)."""
    value = _get_float(LOG_STATS_INTERVAL_ENV, 10.0)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{LOG_STATS_INTERVAL_ENV}={value!r} must be a positive number")
    return value


def force_torch_kernels() -> bool:
    """Use the pure-torch kernel references even on a GPU (debugging, bisecting)."""
    return _get_bool("DISAGG_FORCE_TORCH_KERNELS", False)


def triton_interpret() -> bool:
    """Triton's own interpreter switch (kernels run on CPU, slowly)."""
    return _get_bool("TRITON_INTERPRET", False)


def disable_cuda_graphs() -> bool:
    """Run decode steps eagerly on GPU (debugging; graphs are on by default)."""
    return _get_bool("DISAGG_DISABLE_CUDA_GRAPHS", False)


def dp_lockstep() -> bool:
    """Run data-parallel ranks in lockstep (as ``--dp-lockstep``; either one turns it on)."""
    return _get_bool("DISAGG_DP_LOCKSTEP", False)


def dp_collective_timeout_s() -> float | None:
    """Deadline of each collective among DP ranks (None: ParallelConfig's default)."""
    raw = os.environ.get("DISAGG_DP_COLLECTIVE_TIMEOUT_S")
    if raw is None or raw == "":
        return None
    value = _get_float("DISAGG_DP_COLLECTIVE_TIMEOUT_S", 0.0)
    if value <= 0:
        raise ValueError(f"DISAGG_DP_COLLECTIVE_TIMEOUT_S={raw!r} must be positive")
    return value


def engine_stall_timeout_s() -> float | None:
    """How long a rank with open requests may stay silent (no heartbeat, no output) before the
    frontend fails them with 503 (None: the P/D connector's lease_timeout, else 30 s); keep it
    well above the engine's 0.25 s heartbeat."""
    raw = os.environ.get("DISAGG_ENGINE_STALL_TIMEOUT_S")
    if raw is None or raw == "":
        return None
    value = _get_float("DISAGG_ENGINE_STALL_TIMEOUT_S", 0.0)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"DISAGG_ENGINE_STALL_TIMEOUT_S={raw!r} must be a positive number")
    return value


KV_PARAMS_KEY_ENV = "DISAGG_KV_PARAMS_KEY"
REGISTRATION_KEY_ENV = "DISAGG_REGISTRATION_KEY"
PARENT_PID_ENV = "DISAGG_PARENT_PID"
FAULT_INJECTION_ENV = "DISAGG_FAULT_INJECTION"


def fault_injection() -> bool:
    """TEST/DRILL-ONLY: ``DISAGG_FAULT_INJECTION=1`` lets the KV connector inject faults
    (connectors/faults.py) and opens ``POST /v1/kv_faults``; refused otherwise."""
    return os.environ.get(FAULT_INJECTION_ENV) == "1"


def kv_params_key() -> str | None:
    """Shared secret the proxy sends with kv_transfer_params (as ``--kv-params-key``)."""
    return os.environ.get(KV_PARAMS_KEY_ENV) or None


def parent_pid() -> int | None:
    """``DISAGG_PARENT_PID``: set by ``disagg-proxy --launch`` for its instances, which shut
    down once that process is gone (None: not launched, or not a number)."""
    raw = os.environ.get(PARENT_PID_ENV, "")
    return int(raw) if raw.isdigit() else None


def registration_key() -> str | None:
    """The secret sealing registration frames (as ``--registration-key``)."""
    return os.environ.get(REGISTRATION_KEY_ENV) or None


def api_key() -> str | None:
    """The key ``/v1/*`` requests must send as a Bearer token (as ``--api-key``):
    ``DISAGG_API_KEY``, else vLLM's ``VLLM_API_KEY``."""
    return os.environ.get("DISAGG_API_KEY") or os.environ.get("VLLM_API_KEY") or None


def rank_kv_bytes_for_tests() -> dict[int, int]:
    """TEST-ONLY: per-rank KV budgets, ``DISAGG_TEST_RANK_KV_BYTES="0:8MiB,1:4MiB"``, so tests
    can make DP ranks auto-fit to different max_model_len. Never set it in production."""
    raw = os.environ.get("DISAGG_TEST_RANK_KV_BYTES", "").strip()
    if not raw:
        return {}

    out: dict[int, int] = {}
    for item in raw.split(","):
        rank, sep, size = item.partition(":")
        if not sep or not rank.strip().isdigit():
            raise ConfigError(f"DISAGG_TEST_RANK_KV_BYTES item {item!r} is not RANK:BYTES")
        out[int(rank)] = parse_bytes(size)
    return out
