"""Multi-turn chat at run time: each turn's prompt is the conversation so far plus a new message.

Turn k of a conversation is sent only after turn k-1's answer has streamed in, and its prompt
holds that answer's real text, as in vLLM's and SGLang's multi-round benchmarks. On
``/v1/completions`` the conversation is one text (what a chat template would render)::

    SYSTEM PROMPT
    User: message 1
    Assistant: answer 1
    User: message 2
    Assistant:

so turn k's prompt starts with turn k-1's prompt token for token (up to the seam where the
answer text is re-encoded) and a prefix cache can serve all of it. On
``/v1/chat/completions`` the same turns go as a message list.
"""

from __future__ import annotations

from dataclasses import replace

from bench.client import CHAT_COMPLETIONS, RequestInput, RequestOutput
from bench.datasets import ConversationScript
from disagg.common.tokenizer import Tokenizer

USER_TAG = "\nUser: "
ASSISTANT_TAG = "\nAssistant:"


class ConversationChain:
    """The turns of one conversation as a RequestChain (bench/load.py); one use only.

    The chain stops after the last turn, or after a failed turn (no answer to build on).
    ``prompt_len`` of each request is the tokenizer's count of the whole completions text.
    """

    def __init__(self, script: ConversationScript, template: RequestInput,
                 tokenizer: Tokenizer) -> None:
        self._script = script
        self._template = template
        self._tokenizer = tokenizer
        self._answers: list[str] = []

    @property
    def num_requests(self) -> int:
        """One request per turn."""
        return len(self._script.user_messages)

    def first(self) -> RequestInput:
        """Turn 1: the system prompt and the first user message."""
        self._answers = []
        return self._turn(0)

    def next(self, out: RequestOutput) -> RequestInput | None:
        """The next turn, with ``out``'s answer in its prompt; None when done or failed."""
        if not out.success:
            return None
        self._answers.append(out.generated_text)
        turn = len(self._answers)
        return self._turn(turn) if turn < self.num_requests else None

    def _turn(self, turn: int) -> RequestInput:
        text = conversation_text(self._script, self._answers[:turn], turn)
        messages = None
        if self._template.api_url.endswith(CHAT_COMPLETIONS):
            messages = conversation_messages(self._script, self._answers[:turn], turn)
        return replace(self._template, prompt=text, prompt_len=len(self._tokenizer.encode(text)),
                       output_len=self._script.output_lens[turn], messages=messages)


def conversation_text(script: ConversationScript, answers: list[str], turn: int) -> str:
    """The completions prompt of ``turn`` (0-based): system, earlier turns, the new message."""
    parts = [script.system_prompt]
    for user, answer in zip(script.user_messages[:turn], answers, strict=True):
        parts += [USER_TAG, user, ASSISTANT_TAG, answer]
    parts += [USER_TAG, script.user_messages[turn], ASSISTANT_TAG]
    return "".join(parts)


def conversation_messages(script: ConversationScript, answers: list[str],
                          turn: int) -> list[dict[str, str]]:
    """The chat message list of ``turn`` (0-based)."""
    messages = [{"role": "system", "content": script.system_prompt}] \
        if script.system_prompt else []
    for user, answer in zip(script.user_messages[:turn], answers, strict=True):
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": script.user_messages[turn]})
    return messages
