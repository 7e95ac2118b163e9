"""Random HTTP request bodies for the fail-closed fuzz tests of the instance and the proxy.

Deterministic (``random.Random(seed)``): random JSON values of random types, deep nesting,
integers past 64 bits, extreme floats, NaN/Infinity literals, truncated JSON, bytes that are
not UTF-8, wrong content types and strings of a few hundred KB. Shared by
tests/disagg/test_http_fuzz.py and tests/proxy/test_http_fuzz.py (loaded by path there).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

INTS = (0, 1, -1, 2, 3, 16, 20, 21, 255, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63,
        -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**30, -(10**40))
FLOATS = (0.0, -0.0, 0.5, 1.0, 2.0, 2.5, 1e308, -1e308, 5e-324, 1e-300, -3.5)
STRINGS = ("", "a", "hello", "\x00", "\U0001f600", "<|user|>", "[[[[", "{{{{", "\\", '"',
           "text", "read", "write", "user", "system", "xfer-1", "stats", "barrier", "\u202e")
LITERALS = (b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e400", b"-1e400", b"1e-400",
            b"-0.0", b"1e308", b"9" * 400, b"-" + b"9" * 400, b"0x10", b"01", b"+1", b".5",
            b"1.", b"tru", b"nul", b'"\\ud800"', b'"\\udc00x"', b'"\\u00"', b"'a'", b"[1,]",
            b"{,}", b"\xff", b"\xed\xa0\x80")
CONTENT_TYPES = ("application/json", "application/json", "text/plain", "",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz",
                 "application/json; charset=latin-1", "application/octet-stream")
MAX_HUGE_CHARS = 300_000


@dataclass(frozen=True)
class FuzzCase:
    """One request: its body bytes, its content type, and how the body was made."""

    body: bytes
    content_type: str
    kind: str


class BodyFuzzer:
    """Random request bodies around one valid ``base`` body whose known keys are ``fields``."""

    def __init__(self, seed: int, base: dict[str, Any], fields: Sequence[str]) -> None:
        self.rng = random.Random(seed)
        self.base = base
        self.fields = list(fields)
        self._makers: list[tuple[str, Callable[[], bytes], int]] = [
            ("valid-ish", self._valid_ish, 6), ("field", self._random_fields, 8),
            ("value", lambda: msgspec.json.encode(self.value()), 2),
            ("deep", self._deep, 2), ("literal", self._literal, 4),
            ("truncated", self._truncated, 2), ("bytes", self._bad_bytes, 2),
            ("huge", self._huge, 1)]

    def case(self) -> FuzzCase:
        """The next random request."""
        names, makers, weights = zip(*self._makers, strict=True)
        index = self.rng.choices(range(len(makers)), weights=weights)[0]
        return FuzzCase(makers[index](), self.rng.choice(CONTENT_TYPES), names[index])

    def value(self, depth: int = 0) -> Any:
        """A random JSON value; containers get rarer with depth."""
        kind = self.rng.randrange(7 if depth < 4 else 5)
        if kind == 0:
            return self.rng.choice((None, True, False))
        if kind == 1:
            return self.rng.choice(INTS)
        if kind == 2:
            return self.rng.choice(FLOATS)
        if kind in (3, 4):
            return self._string()
        if kind == 5:
            return [self.value(depth + 1) for _ in range(self.rng.randrange(5))]
        keys = [*self.fields, "role", "content", "type", "text", "x"]
        return {self.rng.choice(keys): self.value(depth + 1) for _ in range(self.rng.randrange(4))}

    def _string(self) -> str:
        if self.rng.random() < 0.6:
            return self.rng.choice(STRINGS)
        alphabet = "ab \n\t\u00e9\u4e2d\U0001f600\x7f"
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randrange(40)))

    def _small_valid(self, field: str) -> Any:
        """A value of roughly the right type and size, so some requests get through."""
        choices: dict[str, Sequence[Any]] = {
            "max_tokens": (1, 2, 3, None), "max_completion_tokens": (1, 2, None),
            "temperature": (0, 0.0, 0.7, 1, 2.0, None), "top_p": (0.1, 1, 1.0),
            "top_k": (-1, 0, 1, 5), "n": (1,), "seed": (0, -1, 7, 2**63 - 1, -(2**63)),
            "stop": ("\n", ["a", "b"], [], None), "stop_token_ids": ([], [1, 2], None),
            "logprobs": (None, 0, 2) if "prompt" in self.base else (True, False),
            "top_logprobs": (0, 1, 5), "min_tokens": (0, 1), "stream": (True, False),
            "stream_options": ({"include_usage": True}, None), "ignore_eos": (True, False),
            "return_token_ids": (True, False), "echo": (False,), "user": ("u", None),
            "presence_penalty": (0, 0.0), "frequency_penalty": (0,),
            "prompt": ("hi", [1, 2, 3], ["hi"], [[5, 6]]), "model": ("builtin:tiny-llama",),
            "messages": ([{"role": "user", "content": "hi"}],
                         [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])}
        return self.rng.choice(choices.get(field, (self.base.get(field),)))

    def _valid_ish(self) -> bytes:
        body = dict(self.base)
        for field in self.rng.sample(self.fields, k=min(len(self.fields), 4)):
            body[field] = self._small_valid(field)
        return msgspec.json.encode(body)

    def _random_fields(self) -> bytes:
        body = dict(self.base)
        for _ in range(self.rng.randrange(1, 4)):
            field = self.rng.choice([*self.fields, "unknown_field"])
            if self.rng.random() < 0.15:
                body.pop(field, None)
            else:
                body[field] = self.value()
        return msgspec.json.encode(body)

    def _nested(self, depth: int) -> bytes:
        if self.rng.random() < 0.5:
            return b"[" * depth + b"1" + b"]" * depth
        return b'{"a":' * depth + b"1" + b"}" * depth

    def _deep(self) -> bytes:
        nested = self._nested(self.rng.choice((65, 200, 1000, 3000, 20_000)))
        where = self.rng.choice([*self.fields, "unknown_field", None])
        if where is None:
            return nested
        return self._with_raw(where, nested)

    def _with_raw(self, field: str, raw_value: bytes) -> bytes:
        """The base body with ``field`` set to raw JSON text (valid or not)."""
        body = {k: v for k, v in self.base.items() if k != field}
        encoded = msgspec.json.encode(body)
        return encoded[:-1] + (b"," if body else b"") + msgspec.json.encode(field) + b":" \
            + raw_value + b"}"

    def _literal(self) -> bytes:
        return self._with_raw(self.rng.choice([*self.fields, "unknown_field"]),
                              self.rng.choice(LITERALS))

    def _truncated(self) -> bytes:
        full = self._valid_ish()
        return full[:self.rng.randrange(len(full))]

    def _bad_bytes(self) -> bytes:
        full = bytearray(self._valid_ish())
        if self.rng.random() < 0.2:
            return bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 64)))
        for _ in range(self.rng.randrange(1, 4)):
            full.insert(self.rng.randrange(len(full) + 1),
                        self.rng.choice((0xFF, 0xC0, 0x80, 0xED, 0x00, 0xFE)))
        return bytes(full)

    def _huge(self) -> bytes:
        num_chars = self.rng.randrange(50_000, MAX_HUGE_CHARS)
        field = self.rng.choice([*self.fields, "unknown_field"])
        if self.rng.random() < 0.3:
            return self._with_raw(field, msgspec.json.encode(
                [self.rng.choice(INTS) for _ in range(num_chars // 8)]))
        return self._with_raw(field, msgspec.json.encode(self.rng.choice("ab\u00e9") * num_chars))


def assert_openai_error(status: int, body: bytes, context: object) -> None:
    """A 4xx with ``{"error": {"message", "type", "param", "code"}}``; never 5xx."""
    assert status < 500, (status, body[:300], context)
    if status < 400:
        return
    err = msgspec.json.decode(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, (body[:300], context)
    assert isinstance(err["message"], str) and err["message"], (body[:300], context)
    assert isinstance(err["type"], str) and err["type"], (body[:300], context)
