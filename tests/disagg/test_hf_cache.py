"""Hugging Face Hub ids resolve from the local cache only (HF_HUB_OFFLINE semantics): a cached
id is its snapshot directory (tokenizer included), an uncached one is one clear ConfigError;
nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from disagg.cli import build_parser, engine_config_from_args
from disagg.common.config import ConfigError
from disagg.common.hf_cache import cached_snapshot, resolve_model
from disagg.common.tokenizer import HFTokenizer, IdTokenizer, get_tokenizer

REPO = "acme/tiny-chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache in tmp_path that huggingface_hub uses (offline)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _cache_model(cache: Path, repo: str = REPO) -> Path:
    """A cached snapshot as huggingface_hub lays it out, with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(
        str(snapshot))
    return snapshot


def test_a_cached_id_is_its_snapshot(hub_cache: Path) -> None:
    snapshot = _cache_model(hub_cache)
    assert Path(resolve_model(REPO)).resolve() == snapshot.resolve()
    tok = get_tokenizer(REPO)
    assert isinstance(tok, HFTokenizer) and tok.encode("hello world") == [1, 2]


def test_an_uncached_id_is_one_clear_line(hub_cache: Path) -> None:
    assert cached_snapshot("acme/absent") is None and cached_snapshot("not//an id") is None
    with pytest.raises(ConfigError) as err:
        resolve_model("acme/absent")
    message = str(err.value)
    assert "\n" not in message and "local cache" in message and "nothing is downloaded" in message
    assert isinstance(get_tokenizer("acme/absent"), IdTokenizer)  # names that are no model


def test_directories_and_builtins_pass_through(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("builtin:tiny-llama") == "builtin:tiny-llama"


def test_serve_takes_a_cached_id_and_reports_it(hub_cache: Path) -> None:
    snapshot = _cache_model(hub_cache)
    cfg = engine_config_from_args(build_parser().parse_args(["serve", REPO]))
    assert Path(cfg.model.model).resolve() == snapshot.resolve()
    assert cfg.model.served_model_name == REPO
    with pytest.raises(ConfigError, match="acme/absent"):
        engine_config_from_args(build_parser().parse_args(["serve", "acme/absent"]))
