"""n > 1: children's seeds and ids, the merge (a failure or a closed stream ends every child),
and a real instance on the built-in tiny model answering n=3 and logit_bias."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest
import requests  # type: ignore[import-untyped]

from disagg.common.openai_api import ApiError
from disagg.common.sampling_params import SEED_MAX, SEED_MIN, SamplingParams
from disagg.server.parallel_sampling import child_params, collect_choices, fan_out, merge
from disagg.server.serving import Delta

TINY = ["builtin:tiny-llama", "--kv-cache-memory-bytes", "32MiB", "--device", "cpu"]


def test_child_seeds_are_seed_plus_index_wrapped_to_64_bits() -> None:
    sp = SamplingParams(seed=SEED_MAX - 1)
    assert [child_params(sp, i).seed for i in range(3)] == [SEED_MAX - 1, SEED_MAX, SEED_MIN]
    unseeded = SamplingParams()
    assert child_params(unseeded, 2) is unseeded


async def _child(tokens: list[int], closed: list[str], name: str, fail: bool = False,
                 block: bool = False) -> AsyncGenerator[Delta, None]:
    try:
        for t in tokens:
            yield Delta(str(t), [t])
        if fail:
            raise ApiError(500, f"{name} failed")
        if block:
            await asyncio.Event().wait()
        yield Delta("", [], finish_reason="length")
    finally:
        closed.append(name)


async def test_merge_tags_indexes_and_collects_in_order() -> None:
    closed: list[str] = []
    deltas = merge([_child([1, 2], closed, "a"), _child([3], closed, "b")])
    results = await collect_choices(deltas, 2)
    assert [r.token_ids for r in results] == [[1, 2], [3]]
    assert [r.finish_reason for r in results] == ["length", "length"]
    assert sorted(closed) == ["a", "b"]


async def test_one_failing_child_ends_the_others() -> None:
    closed: list[str] = []
    deltas = merge([_child([1], closed, "slow", block=True), _child([2], closed, "bad",
                                                                    fail=True)])
    with pytest.raises(ApiError, match="bad failed"):
        await collect_choices(deltas, 2)
    assert sorted(closed) == ["bad", "slow"]


async def test_closing_the_stream_closes_every_child() -> None:
    closed: list[str] = []
    deltas = merge([_child([1], closed, "a", block=True), _child([2], closed, "b", block=True)])
    await anext(deltas)
    await deltas.aclose()  # what the API server does when the client goes away
    assert sorted(closed) == ["a", "b"]


def test_n_one_is_the_plain_request() -> None:
    seen: list[tuple[str, SamplingParams]] = []

    def start(rid: str, sp: SamplingParams) -> Any:
        seen.append((rid, sp))
        return _child([], [], rid)

    sp = SamplingParams(seed=3)
    fan_out(start, "cmpl-x", sp, 1)
    assert seen == [("cmpl-x", sp)]


def _sse_chunks(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and "[DONE]" not in line]


def test_real_instance_n_choices_and_logit_bias(instance_factory: Any) -> None:
    inst = instance_factory(TINY)
    url = inst.url + "/v1/completions"
    base: dict[str, Any] = {"prompt": "hello", "max_tokens": 4, "ignore_eos": True,
                            "return_token_ids": True}
    seeded = {**base, "temperature": 1.0, "seed": 7}
    out = requests.post(url, json={**seeded, "n": 3}, timeout=30).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2], out
    assert out["usage"]["completion_tokens"] == 12 and out["usage"]["prompt_tokens"] == 6
    alone = requests.post(url, json=seeded, timeout=30).json()  # child 0 has seed + 0
    assert out["choices"][0]["token_ids"] == alone["choices"][0]["token_ids"]

    stream = requests.post(url, json={**seeded, "n": 3, "stream": True,
                                      "stream_options": {"include_usage": True}}, timeout=30)
    chunks = _sse_chunks(stream.text)
    ids: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for c in chunks:
        for choice in c["choices"]:
            ids[choice["index"]] += choice["token_ids"]
    assert ids == {c["index"]: c["token_ids"] for c in out["choices"]}  # same seeds, same ids
    assert chunks[-1]["usage"]["completion_tokens"] == 12

    greedy = {**base, "temperature": 0}
    forced = requests.post(url, json={**greedy, "logit_bias": {"65": 100}}, timeout=30).json()
    assert forced["choices"][0]["token_ids"] == [65] * 4 and forced["choices"][0]["text"] == \
        "AAAA"
    # both forced above the rest: a frequency penalty makes the engine alternate them
    both = {**greedy, "max_tokens": 8, "logit_bias": {"65": 100, "66": 100}}
    mixed = requests.post(url, json={**both, "frequency_penalty": 2}, timeout=30).json()
    assert set(mixed["choices"][0]["token_ids"]) == {65, 66}, mixed
    bad = requests.post(url, json={**greedy, "logit_bias": {"100000": 1}}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
