"""Every configuration object, frozen. Derived values go through ``dataclasses.replace``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A user-supplied setting is invalid; the message is shown as one line."""

MAX_LOGPROBS_LIMIT = 1024
"""Upper bound of --max-logprobs (and of any request's logprobs: the wire structs' bound)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Which model, in which precision, on which device."""

    model: str
    """``builtin:tiny-llama`` or a Hugging Face model directory."""
    served_model_name: str
    """Name the API reports and accepts in the ``model`` field."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16 (auto: float32 on CPU, bfloat16 on GPU)."""
    quantization: str | None = None
    """None (the checkpoint's own: fp8 when its config.json says so) | fp8 (fp8 weights with
    128 x 128 block scales, quantized at load; disagg/models/quant.py)."""
    device: str = "auto"
    """auto | cpu | cuda (cuda means any torch GPU, ROCm included)."""
    load_format: str = "auto"
    """auto (weights from files) | dummy (random weights, no files needed)."""
    seed: int = 0
    """Seed for dummy weights and for requests without their own seed."""
    max_model_len: int | None = None
    """Requested context length; None = the model's own, -1 = auto-fit to the KV cache."""
    generation_config: str = "auto"
    """auto | vllm | a path: whose generation_config.json gives EOS ids and sampling defaults
    (disagg/common/generation_config.py)."""
    tokenizer: str | None = None
    """The frontend's tokenizer (a directory or a cached Hub id); None: the model's."""
    chat_template: str | None = None
    """A Jinja chat template (a file path or the template itself) replacing the tokenizer's."""
    trust_remote_code: bool = False
    """Let transformers run a tokenizer's own code (models are always built-in architectures)."""
    enforce_eager: bool = False
    """No CUDA/HIP graphs: every decode step runs eagerly."""
    max_logprobs: int = 20
    """The most logprobs (or top_logprobs) a request may ask for per token."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS_LIMIT:
            raise ConfigError(f"--max-logprobs must be between 0 and {MAX_LOGPROBS_LIMIT}")
        if self.quantization not in (None, "fp8"):
            raise ConfigError(f"--quantization {self.quantization!r} is not supported "
                              "(supported: fp8)")


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
"""Values of --kv-cache-dtype; fp8 and fp8_e4m3 are the same cache (e4m3, fnuz on gfx94x)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16
    """Tokens per KV block."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory the instance may use (weights + activations + KV)."""
    kv_cache_memory_bytes: int | None = None
    """Explicit KV budget; the only sizing input on CPU (default 256 MiB there)."""
    num_gpu_blocks_override: int | None = None
    """Use exactly this many blocks; replaces the measured budget before auto-fit and checks."""
    enable_prefix_caching: bool = True
    """Keep full blocks of computed prefixes for reuse until evicted (vLLM's APC)."""
    kv_cache_dtype: str = "auto"
    """auto (the model's dtype) | fp8 | fp8_e4m3 (e4m3 with per-layer K/V scales; vLLM's name)."""

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is not one of "
                              f"{', '.join(KV_CACHE_DTYPES)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """Batching limits."""

    max_num_seqs: int = 256
    """Most requests in one step."""
    max_num_batched_tokens: int = 2048
    """Most tokens in one step (prefill chunks + decodes)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps."""
    async_scheduling: bool = True
    """Greedy decode batches launch the next step before reading this one's tokens back
    (disagg/engine/engine_core.py ``_step_ahead``); ``--no-async-scheduling`` turns it off."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelConfig:
    """Data parallelism of engine cores behind one frontend, tensor parallelism inside each."""

    tensor_parallel_size: int = 1
    """GPUs (worker processes) one engine core drives; rank 0 is the engine-core process."""
    tensor_parallel_timeout_s: float = 120.0
    """Deadline of each TP collective, worker start and worker call (disagg/engine/tp.py)."""
    data_parallel_size: int = 1
    """Number of engine-core processes."""
    data_parallel_rank: int = 0
    """This engine core's rank."""
    data_parallel_lockstep: bool = False
    """Every rank steps together, idle ranks run dummy steps (expert-parallel MoE needs it)."""
    data_parallel_master_port: int | None = None
    """Port on 127.0.0.1 of the ranks' gloo rendezvous; the frontend picks it at start-up."""
    data_parallel_timeout_s: float = 120.0
    """Deadline of each collective among the ranks (state all-reduce, barrier default)."""
    enable_expert_parallel: bool = False
    """MoE experts sharded over the data-parallel ranks, tokens exchanged by all-to-all in
    every MoE layer (implies lockstep: every rank joins every step)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KVTransferConfig:
    """The ``--kv-transfer-config`` JSON, as in vLLM."""

    kv_connector: str | None = None
    """Registered connector name or ``module:Class`` import path."""
    kv_role: str = "kv_both"
    """kv_producer (prefill) | kv_consumer (decode) | kv_both."""
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)
    """Connector options: transport, mode, transfer_timeout, defer_timeout, base_port, ..."""

    @classmethod
    def from_json(cls, text: str | None) -> KVTransferConfig | None:
        """Parse the CLI flag; a clear ConfigError on bad JSON or fields."""
        if not text:
            return None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--kv-transfer-config is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError("--kv-transfer-config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"--kv-transfer-config: unknown keys {sorted(unknown)}")
        if not isinstance(raw.get("kv_connector", ""), str | None) or \
                not isinstance(raw.get("kv_role", ""), str):
            raise ConfigError("--kv-transfer-config: kv_connector and kv_role must be strings")
        cfg = cls(**raw)
        if not cfg.kv_connector:
            raise ConfigError("--kv-transfer-config needs kv_connector (e.g. \"PDConnector\")")
        if cfg.kv_role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ConfigError(f"kv_role must be kv_producer, kv_consumer or kv_both, "
                              f"got {cfg.kv_role!r}")
        if not isinstance(cfg.kv_connector_extra_config, dict):
            raise ConfigError("kv_connector_extra_config must be a JSON object")
        return cfg

    def extra(self, key: str, default: Any) -> Any:
        """One value from kv_connector_extra_config."""
        return self.kv_connector_extra_config.get(key, default)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """Everything an engine core needs; sent whole to the engine process."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kv_transfer: KVTransferConfig | None = None


def _number(value: str, parse: Callable[[str], Any], what: str, ok: Callable[[Any], bool],
            rule: str) -> Any:
    """An argparse value parsed by ``parse`` and checked by ``ok``; ArgumentTypeError (one
    line from argparse) otherwise."""
    try:
        number = parse(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if not ok(number):
        raise argparse.ArgumentTypeError(f"{rule}, got {value}")
    return number


def port_number(value: str) -> int:
    """argparse type of a TCP port flag: 0 (any free port) to 65535."""
    return int(_number(value, int, "a port number", lambda p: 0 <= p <= 65535,
                       "a port is 0 to 65535"))


def positive_int(value: str) -> int:
    """argparse type of a count that must be at least 1."""
    return int(_number(value, int, "a whole number", lambda n: n >= 1, "must be at least 1"))


def non_negative_int(value: str) -> int:
    """argparse type of a count that may be 0."""
    return int(_number(value, int, "a whole number", lambda n: n >= 0, "must be 0 or more"))


def positive_float(value: str) -> float:
    """argparse type of a duration or interval: finite and greater than 0."""
    return float(_number(value, float, "a number", lambda x: math.isfinite(x) and x > 0,
                         "must be a positive number"))


def checked(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse type from a check that raises ValueError with a readable message."""

    def parse(value: str) -> str:
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__  # argparse names the type in some errors
    return parse


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'64MiB', '1.5G', '4096' -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"cannot parse a byte size from {text!r} (try 256MiB or 1GiB)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_max_model_len(text: str) -> int:
    """'2048', '32k', '1M', 'auto' or '-1' -> tokens (-1 means auto-fit)."""
    t = text.strip().lower()
    if t in ("auto", "-1"):
        return -1
    m = re.match(r"^(\d+)([km]?)$", t)
    if not m:
        raise ConfigError(f"--max-model-len must be a number, 32k, auto or -1; got {text!r}")
    value = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2)]
    if value < 1:
        raise ConfigError("--max-model-len must be positive (or auto / -1)")
    return value
