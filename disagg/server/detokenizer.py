"""Incremental detokenization with stop strings (frontend side)."""

from __future__ import annotations

from disagg.common.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas; finds stop strings.

    Text that could still become part of a stop string, or an incomplete UTF-8 sequence
    (decoded as U+FFFD), is held back until it is safe to emit.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def push(self, new_ids: list[int], final: bool) -> str:
        """Add ids; return the new safe text. Sets ``stopped`` when a stop string appeared."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        self.text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            idx = self.text.find(s, max(0, self.emitted - len(s)))
            if idx >= 0:
                self.stopped = True
                self.text = self.text[:idx]
                return self._take(len(self.text))
        if final:
            return self._take(len(self.text))
        safe = len(self.text) - self._hold if self.stop else len(self.text)
        while safe > self.emitted and self.text[safe - 1] == _REPLACEMENT:
            safe -= 1
        return self._take(safe)

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta
