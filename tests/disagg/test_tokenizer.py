"""Chat prompts tokenize as transformers tokenizes them: a template that writes
``{{ bos_token }}`` (Mistral, Llama-2) gets one BOS, not two, whatever the BOS is called; a
template without one and the plain transcript (no template) behave as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from disagg.common.config import ConfigError
from disagg.common.openai_api import ChatCompletionRequest
from disagg.common.prompt_ids import chat_prompt_ids
from disagg.common.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    frontend_tokenizer,
    get_tokenizer,
)

MESSAGES = [{"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "how are you"}]
WITH_BOS = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
            "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
            "{% endfor %}")
WITHOUT_BOS = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
               "<|assistant|>")


def _save_tokenizer(path: Path, bos: str, template: str | None) -> None:
    """A word-level tokenizer whose encode() adds BOS (as Llama/Mistral tokenizers do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["hello", "there", "hi", "how", "are", "you", "[INST]", "[/INST]", "<|user|>",
             "<|assistant|>", "<unk>", bos, "</s>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>",
                                   unk_token="<unk>")
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(path))


@pytest.mark.parametrize("bos", ["<s>", "<|begin_of_text|>"])
def test_a_template_that_writes_bos_gets_exactly_one(tmp_path: Path, bos: str) -> None:
    from transformers import AutoTokenizer

    _save_tokenizer(tmp_path, bos, WITH_BOS)
    ours = HFTokenizer(str(tmp_path))
    ids = ours.chat_ids(MESSAGES)
    out: Any = AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True)
    want = out["input_ids"] if hasattr(out, "keys") else out  # a BatchEncoding in 5.x
    assert ids == list(want)
    assert ours.encode("hello")[0] == ours.bos_token_id  # a plain prompt still gets its BOS
    assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id
    assert ids == chat_prompt_ids(_chat(MESSAGES), ours)


def test_a_template_without_bos_adds_none(tmp_path: Path) -> None:
    _save_tokenizer(tmp_path, "<s>", WITHOUT_BOS)
    ours = HFTokenizer(str(tmp_path))
    ids = ours.chat_ids(MESSAGES)
    assert ours.bos_token_id not in ids
    assert ids == ours.encode(ours.apply_chat_template(MESSAGES), add_special_tokens=False)


def test_no_template_is_the_transcript_with_the_prompt_bos(tmp_path: Path) -> None:
    _save_tokenizer(tmp_path, "<s>", None)
    ours = HFTokenizer(str(tmp_path))
    ids = ours.chat_ids(MESSAGES)
    assert ids[0] == ours.bos_token_id and ids.count(ours.bos_token_id) == 1
    byte = ByteTokenizer()
    assert byte.chat_ids(MESSAGES) == byte.encode(byte.apply_chat_template(MESSAGES))


def _chat(messages: list[dict[str, str]]) -> ChatCompletionRequest:
    import msgspec

    return msgspec.convert({"messages": messages}, ChatCompletionRequest)


def test_chat_template_from_a_file_or_inline_replaces_the_tokenizers(tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    _save_tokenizer(tok_dir, "<s>", None)  # no template of its own
    (tmp_path / "t.jinja").write_text(WITHOUT_BOS)
    for template in (str(tmp_path / "t.jinja"), WITHOUT_BOS):
        tok = get_tokenizer(str(tok_dir), chat_template=template)
        assert isinstance(tok, HFTokenizer)
        assert tok.apply_chat_template(MESSAGES) == (
            "<|user|>hello there<|assistant|>hi<|user|>how are you<|assistant|>")
    with pytest.raises(ConfigError, match="neither a file nor a Jinja template"):
        get_tokenizer(str(tok_dir), chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="needs a Hugging Face tokenizer"):
        get_tokenizer("builtin:tiny-llama", chat_template=WITHOUT_BOS)


TEXTS = ["héllo wörld, ça va? 日本語のテキスト 🙂 emoji " * 3,
         "The quick brown fox jumps over the lazy dog " * 3]


def _save_bpe(path: Path, kind: str) -> None:
    """A small BPE trained here: byte-level (GPT-2, Llama-3) or Metaspace (SentencePiece:
    Llama-2, Mistral), whose decode drops the first token's leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "byte-level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(TEXTS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(path))


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_streamed_text_is_the_whole_decode(tmp_path: Path, kind: str) -> None:
    """The frontend decodes a window per token (disagg/server/detokenizer.py): one id at a
    time it streams exactly what decoding the whole output gives, with characters split
    over several tokens and SentencePiece's dropped leading space."""
    from disagg.server.detokenizer import IncrementalDetokenizer

    _save_bpe(tmp_path, kind)
    tok = HFTokenizer(str(tmp_path))
    eos = tok.eos_token_id
    assert eos is not None
    for text in ["héllo wörld 🙂 日本 ok", " leading space and  double", "The fox 🙂🙂 ça",
                 "brown fox"]:
        ids = tok.encode(text, add_special_tokens=False)
        for case in (ids, [*ids[:3], eos, eos, *ids[3:]], [eos, *ids]):  # specials skipped
            detok = IncrementalDetokenizer(tok, ())
            streamed = "".join(detok.push([i], final=n == len(case) - 1)
                               for n, i in enumerate(case))
            assert streamed == tok.decode(case), (kind, case)


def test_a_tokenizer_given_by_flag_must_be_one(tmp_path: Path) -> None:
    """--tokenizer never falls back to token ids, and files transformers cannot read are a
    ConfigError (one line at start), not a traceback."""
    with pytest.raises(ConfigError, match="no tokenizer files"):
        frontend_tokenizer("builtin:tiny-llama", str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer of"):
        frontend_tokenizer("builtin:tiny-llama", str(tmp_path))
    assert frontend_tokenizer("builtin:tiny-llama", None).encode("hi")
