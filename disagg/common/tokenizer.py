"""Tokenizers: the built-in byte-level one and Hugging Face tokenizers behind one protocol."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from disagg.common.config import ConfigError

BYTE_VOCAB = 256
BUILTIN_BOS_ID = 256
BUILTIN_EOS_ID = 257
BUILTIN_PAD_ID = 258
BUILTIN_VOCAB_SIZE = 320  # bytes + specials, padded to a multiple of 64


RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "tokenize",
    "add_generation_prompt", "continue_final_message", "return_dict", "return_tensors",
    "padding", "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask"})
"""Names ``apply_chat_template`` takes itself: a request's chat_template_kwargs cannot set them."""


@dataclass(frozen=True)
class ChatOptions:
    """How a chat is rendered (a request's vLLM fields; the defaults are the usual chat)."""

    add_generation_prompt: bool = True
    """End with the assistant turn's header, for the model to write it."""
    continue_final_message: bool = False
    """End inside the last message (an assistant prefix the model continues)."""
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """More variables for the template (``enable_thinking``, ...); RESERVED_TEMPLATE_KWARGS
    are refused at the edge."""


DEFAULT_CHAT = ChatOptions()


class Tokenizer(Protocol):
    """What the engine frontend and the benchmarks need from a tokenizer."""

    eos_token_id: int | None
    bos_token_id: int | None
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to token ids (with BOS when the model expects one)."""
        ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Token ids to text."""
        ...

    def apply_chat_template(self, messages: list[dict[str, str]],
                            options: ChatOptions = DEFAULT_CHAT) -> str:
        """Render chat messages into one prompt string, ending with the assistant turn."""
        ...

    def chat_ids(self, messages: list[dict[str, str]],
                 options: ChatOptions = DEFAULT_CHAT) -> list[int]:
        """Token ids of the rendered chat, as transformers' ``apply_chat_template(tokenize=
        True)`` makes them: a chat template writes its own BOS, none is added on top."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then BOS/EOS/PAD. Built locally, no download."""

    eos_token_id: int | None = BUILTIN_EOS_ID
    bos_token_id: int | None = BUILTIN_BOS_ID
    vocab_size = BUILTIN_VOCAB_SIZE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """BOS + the UTF-8 bytes."""
        ids = list(text.encode("utf-8"))
        return [BUILTIN_BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Bytes back to text; invalid UTF-8 becomes U+FFFD, specials are dropped."""
        data = bytes(i for i in ids if 0 <= i < BYTE_VOCAB)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]],
                            options: ChatOptions = DEFAULT_CHAT) -> str:
        """A plain role-tagged transcript (it has no template variables)."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        if options.continue_final_message:
            return text.removesuffix("\n")
        return text + "<|assistant|>\n" if options.add_generation_prompt else text

    def chat_ids(self, messages: list[dict[str, str]],
                 options: ChatOptions = DEFAULT_CHAT) -> list[int]:
        """BOS + the transcript's bytes (the transcript has no special tokens of its own)."""
        return self.encode(self.apply_chat_template(messages, options))


class IdTokenizer(ByteTokenizer):
    """For model directories without tokenizer files (``--load-format dummy`` configs): text
    in is UTF-8 bytes; ids outside the byte range come out as ``<id>`` so output stays visible.
    (The engine checks prompt ids against the model's own vocabulary too.)"""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Bytes as text, other ids as ``<id>``."""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if 0 <= i < BYTE_VOCAB:
                run.append(i)
                continue
            if run:
                parts.append(bytes(run).decode("utf-8", errors="replace"))
                run = []
            parts.append(f"<{i}>")
        if run:
            parts.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A transformers tokenizer behind the Tokenizer protocol."""

    def __init__(self, path: str, *, chat_template: str | None = None,
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if chat_template is not None:
            self._tok.chat_template = chat_template
        self.eos_token_id = self._tok.eos_token_id
        self.bos_token_id = self._tok.bos_token_id
        self.vocab_size = len(self._tok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids as the model was trained."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text for ids."""
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, str]],
                            options: ChatOptions = DEFAULT_CHAT) -> str:
        """The tokenizer's own chat template; a plain transcript when it has none."""
        if getattr(self._tok, "chat_template", None):
            return str(self._tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=options.add_generation_prompt,
                continue_final_message=options.continue_final_message,
                **options.template_kwargs))
        return ByteTokenizer().apply_chat_template(messages, options)

    def chat_ids(self, messages: list[dict[str, str]],
                 options: ChatOptions = DEFAULT_CHAT) -> list[int]:
        """The template's text tokenized without added specials (it writes its own BOS, if
        the model has one: ``{{ bos_token }}`` must not become two); the plain transcript
        (no template) gets them as any prompt does."""
        has_template = bool(getattr(self._tok, "chat_template", None))
        return self.encode(self.apply_chat_template(messages, options),
                           add_special_tokens=not has_template)


def read_chat_template(value: str) -> str:
    """``--chat-template``: a file's text, or the value itself when it is not a file (vLLM
    takes both); a value that looks like a path but is missing is a ConfigError."""
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--chat-template {value!r}: {exc}") from None
    if os.path.exists(value):  # a directory, a fifo, a device: nothing to read a template from
        raise ConfigError(f"--chat-template {value!r} is not a regular file")
    if "{" not in value:
        raise ConfigError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def frontend_tokenizer(model: str, tokenizer: str | None, *, chat_template: str | None = None,
                       trust_remote_code: bool = False) -> Tokenizer:
    """The server's tokenizer, built before any engine starts (so a bad flag is one line, not
    a traceback after the weights loaded): ``--tokenizer`` when given, which must name a
    tokenizer (a directory or a cached Hub id with tokenizer files; no fallback to token ids),
    else the model's (get_tokenizer)."""
    if tokenizer is not None and not tokenizer.startswith("builtin:"):
        path = tokenizer
        if not os.path.isdir(path):
            from disagg.common.hf_cache import cached_snapshot

            path = cached_snapshot(tokenizer) or ""
        if not path or not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            raise ConfigError(f"--tokenizer {tokenizer!r}: no tokenizer files there (a "
                              "directory, or a Hugging Face id in the local cache, with "
                              f"{' or '.join(_TOKENIZER_FILES)})")
    try:
        return get_tokenizer(tokenizer or model, chat_template=chat_template,
                             trust_remote_code=trust_remote_code)
    except ConfigError:
        raise
    except Exception as exc:  # files transformers or tokenizers cannot read (any type)
        raise ConfigError(f"tokenizer of {tokenizer or model}: {exc}") from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def get_tokenizer(model: str, *, chat_template: str | None = None,
                  trust_remote_code: bool = False) -> Tokenizer:
    """``builtin:*`` -> ByteTokenizer; a directory (or a Hugging Face id in the local cache)
    with tokenizer files -> HFTokenizer; anything else -> IdTokenizer (callers that must not
    fall back resolve the name first: disagg/common/hf_cache.py resolve_model).
    ``chat_template`` (a file or a template) replaces a Hugging Face tokenizer's own; the
    others have none to replace (ConfigError)."""
    template = None if chat_template is None else read_chat_template(chat_template)
    if model.startswith("builtin:"):
        if template is not None:
            raise ConfigError("--chat-template needs a Hugging Face tokenizer (--tokenizer); "
                              "the built-in one writes a plain transcript")
        return ByteTokenizer()
    if not os.path.isdir(model):
        from disagg.common.hf_cache import cached_snapshot

        model = cached_snapshot(model) or model
    has_files = os.path.isdir(model) and any(
        os.path.exists(os.path.join(model, f)) for f in _TOKENIZER_FILES)
    if has_files:
        return HFTokenizer(model, chat_template=template, trust_remote_code=trust_remote_code)
    if template is not None:
        raise ConfigError(f"--chat-template: {model} has no tokenizer files to apply it to")
    return IdTokenizer()
