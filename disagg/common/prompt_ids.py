"""The tokenizer's side of an OpenAI request: a prompt (text or ids) or chat messages (through
the chat template) to token ids, truncation to ``truncate_prompt_tokens``, and the ids of the
tokenize endpoint, each checked against the tokenizer. The request structs and their
validation live in openai_api.py.
"""

from __future__ import annotations

from disagg.common.openai_api import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    TokenizeRequest,
)
from disagg.common.tokenizer import RESERVED_TEMPLATE_KWARGS, ChatOptions, Tokenizer


def prompt_ids_of(prompt: str | list[int], tok: Tokenizer) -> list[int]:
    """One checked prompt's token ids (a text encoded, ids bounded by the vocabulary)."""
    if isinstance(prompt, str):
        ids = tok.encode(prompt)
        if not ids:  # "" with a tokenizer that adds no BOS (with one, vLLM starts from it)
            raise ApiError(400, "the prompt is empty", param="prompt")
        return ids
    bad = [t for t in prompt if t >= tok.vocab_size]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is out of range [0, {tok.vocab_size})",
                       param="prompt")
    return list(prompt)


def _plain_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the chat template takes them (text parts joined)."""
    if not messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    msgs = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text or "" for p in content if p.type == "text")
        msgs.append({"role": m.role, "content": content or ""})
    return msgs


def chat_options(req: ChatCompletionRequest) -> ChatOptions:
    """The request's chat rendering options; 400 for a template kwarg the renderer owns."""
    kwargs = req.chat_template_kwargs or {}
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise ApiError(400, f"chat_template_kwargs cannot set {reserved[0]!r}",
                       param="chat_template_kwargs")
    return ChatOptions(add_generation_prompt=req.add_generation_prompt,
                       continue_final_message=req.continue_final_message,
                       template_kwargs=kwargs)


def chat_prompt_ids(req: ChatCompletionRequest, tok: Tokenizer) -> list[int]:
    """Render the chat template and tokenize it; a template that refuses the chat (its own
    ``raise_exception``, a continue_final_message without a last message to continue) is a
    400 with its reason."""
    options = chat_options(req)
    try:
        return tok.chat_ids(_plain_messages(req.messages), options)
    except ApiError:
        raise
    except Exception as exc:  # jinja2's TemplateError, transformers' ValueError
        raise ApiError(400, f"the chat template cannot render these messages: "
                            f"{str(exc)[:500]}", param="messages") from None


def truncated_prompt(ids: list[int], req: CompletionRequest | ChatCompletionRequest,
                     max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last k ids (-1: the last max_model_len)."""
    k = req.truncate_prompt_tokens
    if k is None:
        return ids
    if k == -1:
        k = max_model_len
    return ids[-k:] if k else ids


def tokenize_ids(req: TokenizeRequest, tok: Tokenizer) -> list[int]:
    """The ids of a /tokenize request: its prompt, or its rendered chat; 400 unless exactly one
    of the two is given or when a message has non-text parts."""
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
    if req.prompt is not None:
        return tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    assert req.messages is not None
    for m in req.messages:
        for part in m.content if isinstance(m.content, list) else ():
            if part.type != "text":
                raise ApiError(400, f"content parts of type {part.type!r} are not supported",
                               param="messages")
    msgs = _plain_messages(req.messages)
    options = ChatOptions(add_generation_prompt=req.add_generation_prompt,
                          continue_final_message=req.continue_final_message)
    try:
        if req.add_special_tokens:
            return tok.encode(tok.apply_chat_template(msgs, options), add_special_tokens=True)
        return tok.chat_ids(msgs, options)
    except Exception as exc:  # jinja2's TemplateError, transformers' ValueError
        raise ApiError(400, f"the chat template cannot render these messages: "
                            f"{str(exc)[:500]}", param="messages") from None


def check_token_ids(ids: list[int], tok: Tokenizer, param: str) -> None:
    """400 for an id outside the tokenizer's vocabulary."""
    bad = [t for t in ids if t >= tok.vocab_size]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is out of range [0, {tok.vocab_size})",
                       param=param)
