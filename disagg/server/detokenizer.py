"""Incremental detokenization with stop strings (frontend side)."""

from __future__ import annotations

from disagg.common.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
CONTEXT_IDS = 6
"""Ids already read that start each window: a token's text may depend on what precedes it
(SentencePiece drops the space of a text's first word, and a skipped special token before it
leaves it first), so the window begins a few tokens back, as vLLM's does."""


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas; finds stop strings.

    Text that could still become part of a stop string, or an incomplete UTF-8 sequence
    (decoded as U+FFFD), is held back until it is safe to emit.

    Each push decodes only a window of the last ids (CONTEXT_IDS before the new ones), not
    the whole output: decoding everything per token made a long generation quadratic on the
    frontend's event loop. The new text is the window's decoding minus that of its part
    already read; both start at the same token, so a tokenizer that renders a token
    differently at the start of a text (SentencePiece's leading space) agrees with itself.

    As vLLM: a stop token (EOS, ``stop_token_ids``) ends the output without its text, and a
    stop string ends it before the string, unless ``include_stop`` (the request's
    ``include_stop_str_in_output``); stop strings count only once more than ``min_tokens``
    tokens exist.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], *, min_tokens: int = 0,
                 include_stop: bool = False, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.min_tokens = min_tokens
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.num_ids = 0
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self.stop_string: str | None = None
        """The stop string that ended the output (vLLM's ``stop_reason``)."""
        self._ids: list[int] = []  # the ids whose text counts (a final stop token's does not)
        self._prefix = 0  # the window's first id
        self._read = 0  # ids up to here are in ``text``
        self._gated = 0  # text made while stop strings did not count yet (min_tokens)
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def push(self, new_ids: list[int], final: bool, *, stop_token: bool = False) -> str:
        """Add ids; return the new safe text. Sets ``stopped`` when a stop string appeared.
        ``stop_token``: the last id ended the request as a stop token (its text is left out
        unless ``include_stop``)."""
        if self.stopped:
            return ""
        self.num_ids += len(new_ids)
        if stop_token and new_ids and not self.include_stop:
            new_ids = new_ids[:-1]
        self._ids.extend(new_ids)
        self._read_window(final)
        if self.stop and self.num_ids <= self.min_tokens:
            self._gated = len(self.text)
        elif self.stop:
            for s in self.stop:
                idx = self.text.find(s, max(0, self.emitted - len(s), self._gated - len(s) + 1))
                if idx >= 0:
                    self.stopped, self.stop_string = True, s
                    self.text = self.text[:idx + len(s) if self.include_stop else idx]
                    return self._take(len(self.text))
        if final:
            return self._take(len(self.text))
        safe = len(self.text) - self._hold if self.stop else len(self.text)
        return self._take(safe)

    def _read_window(self, final: bool) -> None:
        if self._read == len(self._ids):
            return
        window = self._decode(self._ids[self._prefix:])
        if window.endswith(_REPLACEMENT) and not final:
            return  # an incomplete UTF-8 sequence: wait for its next bytes
        head = self._decode(self._ids[self._prefix:self._read])
        if not window.startswith(head):  # never seen; decode everything rather than guess
            self.text = self._decode(self._ids)
        else:
            self.text += window[len(head):]
        self._read = len(self._ids)
        self._prefix = max(0, self._read - CONTEXT_IDS)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta
