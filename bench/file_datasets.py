"""Prompts read from files: ShareGPT JSON, custom JSONL, Hugging Face datasets.

* ``sharegpt``: a JSON list of ``{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}``. The first human turn is the prompt; the token count
  of the first gpt answer after it is the output length (``--sharegpt-output-len`` replaces
  it). vLLM's filter applies: prompt and answer of at least 4 tokens, prompt at most 1024,
  prompt + answer at most 2048 (no answer minimum when the output length is fixed).
* ``custom``: JSON lines ``{"prompt": ..., "output_tokens": N}``, ``output_tokens`` optional
  (``--custom-output-len`` when absent); no length filter.
* ``hf``: rows of a Hugging Face dataset (a ``save_to_disk`` directory, a local dataset
  directory or a hub id already in the cache: nothing is downloaded), read with the optional
  ``datasets`` package; each row is ShareGPT-shaped (``conversations``) or custom-shaped
  (``prompt``, optional ``output_tokens``).

Rows are drawn in a seeded random order (same seed, same requests) until ``num_prompts`` pass;
when fewer rows pass, passing ones are drawn again at random to fill the count (vLLM's
oversampling) and a note says so. Every problem with a file is a ValueError of one line.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.dataset_config import DatasetConfig, SampleRequest
from disagg.common.tokenizer import Tokenizer

MIN_SEQ_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048
HUMAN_ROLES = frozenset({"human", "user"})
ANSWER_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing"})
_SHAREGPT_SHAPE = 'a JSON list of {"conversations": [{"from": ..., "value": ...}, ...]} objects'


@dataclass(frozen=True, slots=True)
class Entry:
    """One usable row: a prompt and where its output length comes from."""

    prompt: str
    answer: str | None = None
    """ShareGPT's first answer (its token count is the output length; the filter applies)."""
    output_len: int | None = None
    """An explicit output length (custom's ``output_tokens``)."""


def _text(turn: Any, *keys: str) -> str | None:
    """The first string among ``turn[key]``."""
    if not isinstance(turn, dict):
        return None
    for key in keys:
        if isinstance(turn.get(key), str):
            return str(turn[key])
    return None


def conversation_entry(turns: Any) -> Entry | None:
    """The first human turn and the first answer after it, or None when there is no such pair
    (such rows are skipped, as vLLM skips conversations of fewer than two turns)."""
    if not isinstance(turns, list):
        return None
    roles = [(_text(t, "from", "role") or "").lower() for t in turns]
    for i, role in enumerate(roles):
        prompt = _text(turns[i], "value", "content")
        if role in HUMAN_ROLES and prompt:
            for j in range(i + 1, len(turns)):
                answer = _text(turns[j], "value", "content")
                if roles[j] in ANSWER_ROLES and answer is not None:
                    return Entry(prompt, answer=answer)
            return None
    return None


def _output_tokens(value: Any, where: str) -> int | None:
    """A row's ``output_tokens``: absent, or a whole number >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: 'output_tokens' must be a whole number >= 1, got {value!r}")
    return value


def prompt_entry(row: dict[str, Any], where: str) -> Entry:
    """A custom-shaped row: a non-empty ``prompt`` string and optional ``output_tokens``."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: needs a non-empty 'prompt' string")
    return Entry(prompt, output_len=_output_tokens(row.get("output_tokens"), where))


def _read_text(path: str) -> str:
    """The file's text, or ValueError naming the problem."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--dataset-path {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--dataset-path {path} is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--dataset-path {path} cannot be read: {exc}") from None


def read_sharegpt(path: str) -> list[Entry]:
    """The usable conversations of a ShareGPT JSON file."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"--dataset-path {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"--dataset-path {path} is not a ShareGPT file: expected "
                         f"{_SHAREGPT_SHAPE}")
    entries = [conversation_entry(row.get("conversations")) for row in data
               if isinstance(row, dict)]
    usable = [e for e in entries if e is not None]
    if not usable:
        raise ValueError(f"--dataset-path {path} has no conversation with a human turn and an "
                         f"answer after it; expected {_SHAREGPT_SHAPE}")
    return usable


def read_custom(path: str) -> list[Entry]:
    """Every row of a custom JSONL file (blank lines skipped)."""
    entries = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"--dataset-path {path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with a 'prompt' string")
        entries.append(prompt_entry(row, where))
    if not entries:
        raise ValueError(f"--dataset-path {path} has no prompt (expected JSON lines like "
                         '{"prompt": "...", "output_tokens": 128})')
    return entries


def _load_hf_rows(cfg: DatasetConfig) -> Iterable[Any]:
    """The split's rows, from a saved dataset directory or the datasets cache."""
    # Before the import, which reads it: like models, a dataset comes from disk or the cache.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ValueError("--dataset-name hf needs the 'datasets' package: "
                         "pip install datasets") from None
    path = str(cfg.dataset_path)
    where = (f"Hugging Face dataset {path!r}" + (f" subset {cfg.hf_subset!r}" if cfg.hf_subset
                                                 else "") + f" split {cfg.hf_split!r}")
    try:
        if any((Path(path) / name).is_file() for name in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(path)
            return loaded[cfg.hf_split] if isinstance(loaded, datasets.DatasetDict) else loaded
        rows: Iterable[Any] = datasets.load_dataset(path, cfg.hf_subset, split=cfg.hf_split)
        return rows
    except Exception as exc:  # a third-party loader's every failure becomes one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"cannot load {where} from disk or the local cache: "
                         f"{type(exc).__name__}: {reason}") from None


def read_hf(cfg: DatasetConfig) -> list[Entry]:
    """The usable rows of a Hugging Face dataset (``conversations`` or ``prompt`` rows)."""
    entries = []
    for number, row in enumerate(_load_hf_rows(cfg)):
        if not isinstance(row, dict):
            raise ValueError(f"hf row {number} is not a mapping of columns")
        if "conversations" in row:
            entry = conversation_entry(row["conversations"])
            if entry is not None:
                entries.append(entry)
        elif "prompt" in row:
            entries.append(prompt_entry(row, f"hf row {number}"))
        else:
            raise ValueError(f"hf rows need a 'conversations' or a 'prompt' column; row "
                             f"{number} has {', '.join(map(str, row)) or 'none'}")
    if not entries:
        raise ValueError(f"the hf dataset {cfg.dataset_path} has no usable row")
    return entries


def _passes_filter(prompt_len: int, output_len: int, fixed_output: bool) -> bool:
    """vLLM's ShareGPT filter: neither too short nor too long."""
    too_short = prompt_len < MIN_SEQ_TOKENS or (not fixed_output and output_len < MIN_SEQ_TOKENS)
    too_long = prompt_len > MAX_PROMPT_TOKENS or prompt_len + output_len > MAX_TOTAL_TOKENS
    return not (too_short or too_long)


def _to_request(cfg: DatasetConfig, tokenizer: Tokenizer, entry: Entry) -> SampleRequest | None:
    """The request of one entry, or None when the ShareGPT filter drops it."""
    prompt_len = len(tokenizer.encode(entry.prompt))
    fixed = {"sharegpt": cfg.sharegpt_output_len, "hf": cfg.hf_output_len}.get(cfg.name)
    if entry.answer is None:
        return SampleRequest(entry.prompt, prompt_len,
                             fixed or entry.output_len or cfg.custom_output_len)
    output_len = fixed or len(tokenizer.encode(entry.answer, add_special_tokens=False))
    if not _passes_filter(prompt_len, output_len, fixed_output=fixed is not None):
        return None
    return SampleRequest(entry.prompt, prompt_len, output_len)


def _read(cfg: DatasetConfig) -> list[Entry]:
    if cfg.name == "sharegpt":
        return read_sharegpt(str(cfg.dataset_path))
    if cfg.name == "custom":
        return read_custom(str(cfg.dataset_path))
    return read_hf(cfg)


def sample_file_requests(cfg: DatasetConfig, tokenizer: Tokenizer) -> list[SampleRequest]:
    """``cfg.num_prompts`` requests from the dataset file, in a seeded order."""
    entries = _read(cfg)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(entries)).tolist() if cfg.shuffle else range(len(entries))
    requests: list[SampleRequest] = []
    for i in order:
        request = _to_request(cfg, tokenizer, entries[i])
        if request is not None:
            requests.append(request)
            if len(requests) == cfg.num_prompts:
                return requests
    if not requests:
        raise ValueError(f"no prompt of {cfg.dataset_path} passes the length filter (prompt "
                         f"{MIN_SEQ_TOKENS}-{MAX_PROMPT_TOKENS} tokens, answer >= "
                         f"{MIN_SEQ_TOKENS}, both <= {MAX_TOTAL_TOKENS})")
    missing = cfg.num_prompts - len(requests)
    print(f"note: {cfg.dataset_path} has {len(requests)} usable prompts; {missing} drawn again "
          f"to reach {cfg.num_prompts}", file=sys.stderr)
    return requests + [requests[i] for i in rng.choice(len(requests), size=missing).tolist()]
