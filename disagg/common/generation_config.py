"""The model's ``generation_config.json``, read as vLLM's ``--generation-config auto`` reads it.

Two things come out of it:
  - EOS ids: every id of its ``eos_token_id`` (an int or a list) ends generation, next to every
    id of config.json's own ``eos_token_id`` (Llama-3.x-Instruct stops on ``<|eot_id|>`` only
    because generation_config.json lists it);
  - sampling defaults (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``,
    ``max_new_tokens``) the frontend
    uses when a request omits the field. Like vLLM (``GenerationConfig.to_diff_dict``), a value
    equal to transformers' own default is no default at all (``top_k: 50`` changes nothing).

``--generation-config``: ``auto`` (the model directory's file), ``vllm`` (no sampling defaults;
the EOS ids of the model's file still apply, as in vLLM) or a directory / file path.
No torch here: the frontend reads the defaults, the engine core the EOS ids.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from disagg.common.config import ConfigError

FILE_NAME = "generation_config.json"
MODES = ("auto", "vllm")
"""The values of --generation-config that are not a path."""
_HF_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 50,
                                "repetition_penalty": 1.0, "min_p": None}
"""transformers' GenerationConfig defaults: such a value in the file asks for nothing."""
UNSUPPORTED_DEFAULTS: tuple[str, ...] = ()
"""Sampling defaults vLLM takes from the file that disagg does not implement (warned about)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingDefaults:
    """Request fields' defaults from the model's generation config (None: the API default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    """``max_new_tokens``: used when the request gives no max_tokens (still capped by the
    context left)."""

    def describe(self) -> str:
        """``temperature=0.6, top_p=0.9`` (only the fields set)."""
        return ", ".join(f"{k}={v}" for k in ("temperature", "top_p", "top_k", "min_p",
                                              "repetition_penalty", "max_tokens")
                         if (v := getattr(self, k)) is not None)


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationConfig:
    """What disagg uses of one generation_config.json."""

    eos_token_ids: tuple[int, ...] = ()
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    ignored: tuple[str, ...] = ()
    """``key=value`` of sampling defaults the file sets that disagg cannot apply."""


def eos_ids(value: Any, where: str) -> tuple[int, ...]:
    """An ``eos_token_id`` value (None, an int or a list of ints) as a tuple; else ConfigError."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(type(i) is int and i >= 0 for i in items):
        raise ConfigError(f"{where}: eos_token_id must be a token id or a list of them, "
                          f"got {value!r}")
    return tuple(items)


def _number(raw: dict[str, Any], key: str, where: str, ok: Any) -> Any:
    value = raw.get(key)
    if value is None or value == _HF_DEFAULTS.get(key):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        raise ConfigError(f"{where}: {key} {value!r} is out of range")
    return value


def parse_generation_config(raw: Any, where: str = FILE_NAME) -> GenerationConfig:
    """The EOS ids and sampling defaults of a parsed generation_config.json."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a JSON object")
    top_k = _number(raw, "top_k", where, lambda v: int(v) == v and v >= -1)
    max_new = _number(raw, "max_new_tokens", where, lambda v: int(v) == v and v >= 1)
    defaults = SamplingDefaults(
        temperature=_number(raw, "temperature", where, lambda v: math.isfinite(v) and v >= 0),
        top_p=_number(raw, "top_p", where, lambda v: 0 < v <= 1),
        top_k=None if top_k is None else max(int(top_k), 0),
        min_p=_number(raw, "min_p", where, lambda v: 0 <= v <= 1),
        repetition_penalty=_number(raw, "repetition_penalty", where,
                                   lambda v: 0.01 <= v <= 100),
        max_tokens=None if max_new is None else int(max_new))
    ignored = tuple(f"{k}={raw[k]}" for k in UNSUPPORTED_DEFAULTS
                    if raw.get(k) is not None and raw[k] != _HF_DEFAULTS.get(k, 0))
    return GenerationConfig(eos_token_ids=eos_ids(raw.get("eos_token_id"), where),
                            defaults=defaults, ignored=ignored)


def generation_config_path(model: str, mode: str) -> str | None:
    """The file ``--generation-config`` names for ``model``: None when there is none to read
    (a builtin model, or a model directory without the file); a given path that does not
    hold the file is a ConfigError."""
    if mode in MODES:
        if model.startswith("builtin:"):
            return None
        path = os.path.join(model, FILE_NAME)
        return path if os.path.isfile(path) else None
    path = os.path.join(mode, FILE_NAME) if os.path.isdir(mode) else mode
    if not os.path.isfile(path):
        raise ConfigError(f"--generation-config {mode!r} is not auto, vllm, a directory with "
                          f"{FILE_NAME} or such a file")
    return path


def load_generation_config(model: str, mode: str = "auto") -> GenerationConfig:
    """Read the generation config ``mode`` selects; with ``vllm`` its sampling defaults are
    dropped (vLLM's ``--generation-config vllm``), its EOS ids kept."""
    path = generation_config_path(model, mode)
    if path is None:
        return GenerationConfig()
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    gen = parse_generation_config(raw, path)
    if mode == "vllm":
        return GenerationConfig(eos_token_ids=gen.eos_token_ids)
    return gen
