"""Fuzz the instance's HTTP server: no user input gets a 5xx, a traceback or a hang.

A few hundred random bodies per endpoint (tests/disagg/fuzz_bodies.py) against the real app
over a fake engine that encodes every accepted request for the engine core, as the wire does.
"""

from __future__ import annotations

import collections
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from disagg.common.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)


def _load_fuzz_bodies() -> Any:
    name = "disagg_tests_fuzz_bodies"  # by path: tests/ folders are not packages
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("fuzz_bodies.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fuzz = _load_fuzz_bodies()
NUM_CASES = 300
ADMIN = {"Authorization": "Bearer adm"}
ENDPOINTS = {
    "/v1/completions": ({"prompt": "hello", "max_tokens": 2},
                        CompletionRequest.__struct_fields__),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 2}, ChatCompletionRequest.__struct_fields__),
    "/v1/kv_transfer/abort": ({"transfer_id": "xfer-1"}, ("transfer_id",)),
    "/collective_rpc": ({"method": "stats"}, ("method", "args", "timeout")),
    "/tokenize": ({"prompt": "hello"}, TokenizeRequest.__struct_fields__),
    "/detokenize": ({"tokens": [104, 105]}, DetokenizeRequest.__struct_fields__),
}


async def _send(client: Any, path: str, case: Any) -> tuple[int, bytes]:
    headers = {**ADMIN, "Content-Type": case.content_type} if case.content_type else ADMIN
    async with client.post(path, data=case.body, headers=headers) as resp:
        return resp.status, await resp.read()


@pytest.mark.parametrize("path", list(ENDPOINTS))
async def test_random_bodies_never_get_a_5xx(instance_client: Any, path: str) -> None:
    client = await instance_client(admin_key="adm")
    base, fields = ENDPOINTS[path]
    fuzzer = fuzz.BodyFuzzer(seed=sum(map(ord, path)), base=base, fields=fields)
    statuses: collections.Counter[int] = collections.Counter()
    started_s = time.monotonic()
    for i in range(NUM_CASES):
        case = fuzzer.case()
        status, body = await _send(client, path, case)
        fuzz.assert_openai_error(status, body, (i, case.kind, case.body[:200]))
        statuses[status] += 1
    assert statuses[200] >= 10 and statuses[400] >= NUM_CASES // 3, statuses  # both paths ran
    assert time.monotonic() - started_s < 20.0
    ok = fuzz.FuzzCase(fuzz.msgspec.json.encode(base), "application/json", "valid")
    assert (await _send(client, path, ok))[0] == 200  # and it still serves


async def test_the_fuzzer_makes_every_kind_of_body() -> None:
    fuzzer = fuzz.BodyFuzzer(seed=1, base={"prompt": "x"}, fields=("prompt", "seed"))
    cases = [fuzzer.case() for _ in range(NUM_CASES)]
    kinds = collections.Counter(c.kind for c in cases)
    assert set(kinds) == {"valid-ish", "field", "value", "deep", "literal", "truncated",
                          "bytes", "huge"}
    assert max(len(c.body) for c in cases) < 2 * fuzz.MAX_HUGE_CHARS + 1000
    assert any(b"\xff" in c.body or b"\xed" in c.body for c in cases)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("path", list(ENDPOINTS))
async def test_a_body_not_in_its_content_encoding_is_a_400(instance_client: Any, path: str,
                                                           encoding: str) -> None:
    """A Content-Encoding the body is not in fails while the body is read: a 400 with an
    OpenAI-style error, not a 500 (the same class as a truncated body)."""
    client = await instance_client(admin_key="adm")
    headers = {**ADMIN, "Content-Type": "application/json", "Content-Encoding": encoding}
    body = fuzz.msgspec.json.encode(ENDPOINTS[path][0])
    async with client.post(path, data=body, headers=headers) as resp:
        status, raw = resp.status, await resp.read()
    assert status == 400, raw
    fuzz.assert_openai_error(status, raw, encoding)
    assert b"cannot read the request body" in raw
