"""Datasets read from files: ShareGPT, custom JSONL and Hugging Face rows, and their errors."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from bench.datasets import DatasetConfig, sample_requests
from bench.file_datasets import MAX_PROMPT_TOKENS
from disagg.common.tokenizer import ByteTokenizer

TOK = ByteTokenizer()  # one token per byte, plus BOS on the prompt


def _conv(prompt: str, answer: str, *, first: str = "human") -> dict[str, Any]:
    return {"id": prompt[:8], "conversations": [{"from": first, "value": prompt},
                                                {"from": "gpt", "value": answer},
                                                {"from": "human", "value": "and then?"},
                                                {"from": "gpt", "value": "x" * 500}]}


def _sharegpt(tmp_path: Path, rows: list[Any]) -> str:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows))
    return str(path)


def _cfg(name: str, path: str, **kwargs: Any) -> DatasetConfig:
    return DatasetConfig(name=name, dataset_path=path, **{"num_prompts": 3, **kwargs})


def test_sharegpt_prompt_is_the_first_human_turn_and_output_the_first_answer(tmp_path):
    rows = [_conv(f"question number {i}", "a" * (10 + i)) for i in range(5)]
    # a system turn first, and a conversation with no answer: the first counts, the second not
    rows.append({"conversations": [{"from": "system", "value": "be brief"},
                                   {"from": "human", "value": "system first"},
                                   {"from": "gpt", "value": "b" * 7}]})
    rows.append({"conversations": [{"from": "human", "value": "unanswered"}]})
    path = _sharegpt(tmp_path, rows)
    reqs = sample_requests(_cfg("sharegpt", path, num_prompts=6, shuffle=False), TOK)
    assert [r.prompt for r in reqs] == [f"question number {i}" for i in range(5)] + \
        ["system first"]
    assert [r.expected_output_len for r in reqs] == [10, 11, 12, 13, 14, 7]
    assert all(r.prompt_len == len(r.prompt) + 1 for r in reqs)  # + BOS


def test_sharegpt_output_len_override_and_seeded_order(tmp_path):
    path = _sharegpt(tmp_path, [_conv(f"prompt {i:02d}", "ok") for i in range(20)])
    # the answers ("ok", 2 tokens) are too short, unless the output length is fixed
    fixed = sample_requests(_cfg("sharegpt", path, sharegpt_output_len=33), TOK)
    assert [r.expected_output_len for r in fixed] == [33] * 3
    again = sample_requests(_cfg("sharegpt", path, sharegpt_output_len=33), TOK)
    other_seed = sample_requests(_cfg("sharegpt", path, sharegpt_output_len=33, seed=5), TOK)
    assert fixed == again and fixed != other_seed
    assert [r.prompt for r in fixed] != ["prompt 00", "prompt 01", "prompt 02"]  # shuffled


def test_sharegpt_filters_too_short_and_too_long_like_vllm(tmp_path):
    rows = [_conv("ab", "long enough answer"),                    # prompt 3 tokens < 4
            _conv("fine prompt", "abc"),                           # answer 3 tokens < 4
            _conv("p" * MAX_PROMPT_TOKENS, "long enough answer"),  # prompt 1025 > 1024
            _conv("q" * 1000, "r" * 1100),                         # 1001 + 1100 > 2048
            _conv("the one that passes", "four")]
    path = _sharegpt(tmp_path, rows)
    reqs = sample_requests(_cfg("sharegpt", path, num_prompts=1), TOK)
    assert [(r.prompt, r.expected_output_len) for r in reqs] == [("the one that passes", 4)]


def test_too_few_usable_prompts_are_drawn_again_with_a_note(tmp_path, capsys):
    path = _sharegpt(tmp_path, [_conv(f"prompt {i}", "answer") for i in range(2)])
    reqs = sample_requests(_cfg("sharegpt", path, num_prompts=5), TOK)
    assert len(reqs) == 5 and {r.prompt for r in reqs} == {"prompt 0", "prompt 1"}
    assert "has 2 usable prompts; 3 drawn again to reach 5" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("[{not json", "is not valid JSON"),
    ('{"conversations": []}', "is not a ShareGPT file"),
    ('[{"conversations": [{"from": "gpt", "value": "hi"}]}, 3]', "no conversation with"),
])
def test_sharegpt_file_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        sample_requests(_cfg("sharegpt", str(path)), TOK)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_nothing_passing_the_filter_is_an_error(tmp_path):
    path = _sharegpt(tmp_path, [_conv("abc", "d")])
    with pytest.raises(ValueError, match="passes the length filter"):
        sample_requests(_cfg("sharegpt", path), TOK)


def test_custom_jsonl_prompts_with_and_without_output_tokens(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text('{"prompt": "first", "output_tokens": 9}\n\n'
                    '{"prompt": "second"}\n{"prompt": "x", "output_tokens": 1}\n')
    reqs = sample_requests(_cfg("custom", str(path), custom_output_len=40, shuffle=False), TOK)
    assert [(r.prompt, r.prompt_len, r.expected_output_len) for r in reqs] == \
        [("first", 6, 9), ("second", 7, 40), ("x", 2, 1)]  # no length filter for custom


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\nnot json\n', "line 2 is not valid JSON"),
    ('["a"]\n', "line 1: expected a JSON object"),
    ('{"text": "a"}\n', "line 1: needs a non-empty 'prompt' string"),
    ('{"prompt": "a", "output_tokens": 0}\n', "'output_tokens' must be a whole number >= 1"),
    ("\n\n", "has no prompt"),
])
def test_custom_file_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        sample_requests(_cfg("custom", str(path)), TOK)


def test_a_directory_is_not_a_file(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        sample_requests(_cfg("custom", str(tmp_path)), TOK)


@pytest.fixture
def hf_offline(monkeypatch):
    """The loader sets HF_DATASETS_OFFLINE (nothing is downloaded): undone after the test."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.usefixtures("hf_offline")
def test_hf_without_the_datasets_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
    with pytest.raises(ValueError, match="needs the 'datasets' package: pip install datasets"):
        sample_requests(_cfg("hf", "org/name"), TOK)


class _FakeDatasets(types.ModuleType):
    """What bench/file_datasets.py uses of the ``datasets`` package."""

    class DatasetDict(dict):
        pass

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__("datasets")
        self.rows = rows
        self.calls: list[tuple[Any, ...]] = []

    def load_dataset(self, path: str, name: str | None = None, split: str | None = None):
        self.calls.append(("load_dataset", path, name, split))
        if path == "org/missing":
            raise FileNotFoundError("Couldn't find 'org/missing' on the Hub or locally\nmore")
        return self.rows

    def load_from_disk(self, path: str):
        self.calls.append(("load_from_disk", path))
        return self.DatasetDict(train=self.rows, test=self.rows[:1])


@pytest.mark.usefixtures("hf_offline")
def test_hf_rows_of_either_shape_from_the_cache_or_a_saved_dir(monkeypatch, tmp_path):
    rows: list[dict[str, Any]] = [
        {"conversations": [{"role": "user", "content": "hello there"},
                           {"role": "assistant", "content": "general kenobi"}]},
        {"prompt": "a prompt row", "output_tokens": 5}, {"prompt": "no output len"}]
    fake = _FakeDatasets(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    cfg = _cfg("hf", "org/name", hf_subset="sub", hf_split="validation", shuffle=False,
               custom_output_len=17)
    reqs = sample_requests(cfg, TOK)
    assert fake.calls == [("load_dataset", "org/name", "sub", "validation")]
    assert [(r.prompt, r.expected_output_len) for r in reqs] == \
        [("hello there", 14), ("a prompt row", 5), ("no output len", 17)]
    (tmp_path / "dataset_dict.json").write_text("{}")  # what save_to_disk writes
    saved = sample_requests(_cfg("hf", str(tmp_path), hf_split="test", hf_output_len=3,
                                 num_prompts=1), TOK)
    assert fake.calls[-1] == ("load_from_disk", str(tmp_path))
    assert [(r.prompt, r.expected_output_len) for r in saved] == [("hello there", 3)]


@pytest.mark.usefixtures("hf_offline")
def test_hf_load_failures_and_unknown_columns_are_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets([{"text": "x", "label": 1}]))
    with pytest.raises(ValueError) as info:
        sample_requests(_cfg("hf", "org/missing"), TOK)
    assert str(info.value) == ("cannot load Hugging Face dataset 'org/missing' split 'train' "
                               "from disk or the local cache: FileNotFoundError: Couldn't "
                               "find 'org/missing' on the Hub or locally")
    with pytest.raises(ValueError, match="need a 'conversations' or a 'prompt' column; row 0 "
                                         "has text, label"):
        sample_requests(_cfg("hf", "org/name"), TOK)
