"""First token from the prefill: the decode emits the token the prefill sampled, at once, and
computes on from it; the recompute path computes it again. Both give the monolithic output
(greedy and seeded), in READ and WRITE.

One producer/consumer pair per mode serves the whole module; the consumer answering without
kv_transfer_params is the monolithic reference (same weights, same seed)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests  # type: ignore[import-untyped]
from pd_helpers import BASE, info, kv_config, metric, remote_of, settled_metric, wait_clean
from support import Instance, start_instances

FAST: dict[str, Any] = {"transfer_timeout": 3, "defer_timeout": 3, "lease_timeout": 2,
                        "heartbeat_interval": 0.5}
PROMPTS = [[5], [(3 * i) % 200 + 1 for i in range(16)], [(7 * i) % 250 + 1 for i in range(17)],
           [(11 * i) % 240 + 2 for i in range(40)]]
TAKEN = "disagg_kv_connector_first_tokens_received_total"
FAILED = "disagg_kv_connector_transfers_failed_total"
TRACES: dict[str, str] = {}
"""Each mode's step trace file (DISAGG_STEP_TRACE_FILE, shared by P and D)."""


@pytest.fixture(scope="module", params=["read", "write"])
def pair(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Instance, Instance]]:
    """(mode, P, D); D recomputes when a load fails and accepts fault rules."""
    mode = request.param
    started = start_instances(
        [[*BASE, "--no-enable-prefix-caching", "--kv-transfer-config",
          kv_config("kv_producer", mode, **FAST)],
         [*BASE, "--no-enable-prefix-caching", "--kv-transfer-config",
          kv_config("kv_consumer", mode, kv_load_failure_policy="recompute", **FAST)]],
        tmp_path_factory.mktemp(f"first-token-{mode}"),
        env={"DISAGG_FAULT_INJECTION": "1", "DISAGG_STEP_TRACE_FILE": TRACES.setdefault(
            mode, str(tmp_path_factory.mktemp(f"steps-{mode}") / "steps.jsonl"))})
    try:
        yield mode, started[0], started[1]
    finally:
        for inst in started:
            inst.stop()


def _body(prompt: list[int], **kw: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **kw}


def _tokens(reply: requests.Response) -> list[int]:
    assert reply.status_code == 200, reply.text
    return list(reply.json()["choices"][0]["token_ids"])


def _mono(d: Instance, body: dict[str, Any]) -> list[int]:
    return _tokens(requests.post(d.url + "/v1/completions", json=body, timeout=60))


def _unstreamed(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as a non-streamed request (stream_options only go with stream: true)."""
    return {**{k: v for k, v in body.items() if k != "stream_options"}, "stream": False}


def _read_params(p: Instance, body: dict[str, Any]) -> dict[str, Any]:
    """Prefill on P (READ); the params P answered, as the proxy hands them to D."""
    tid = uuid.uuid4().hex
    r = requests.post(p.url + "/v1/completions", timeout=60, json={
        **_unstreamed(body), "max_tokens": 1,
        "kv_transfer_params": {"transfer_id": tid, "do_remote_decode": True, "mode": "read"}})
    assert r.status_code == 200, r.text
    return {**r.json()["kv_transfer_params"], "do_remote_prefill": True, "transfer_id": tid}


def _pd(mode: str, p: Instance, d: Instance, body: dict[str, Any],
        recompute: bool = False) -> list[int]:
    """One P/D request as the proxy runs it; the decode's token ids."""
    if mode == "read":
        params = _read_params(p, body)
        if recompute:
            params = {k: v for k, v in params.items() if k != "first_token_id"}
            params["recompute_first_token"] = True
        return _tokens(requests.post(d.url + "/v1/completions", timeout=60,
                                     json={**body, "kv_transfer_params": params}))
    tid = uuid.uuid4().hex
    p_params = {"transfer_id": tid, "do_remote_decode": True, "mode": "write",
                **remote_of(info(d.url))}
    d_params = {"transfer_id": tid, "do_remote_prefill": True, "mode": "write",
                **remote_of(info(p.url)), **({"recompute_first_token": True} if recompute else {})}
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        p_fut = pool.submit(requests.post, p.url + "/v1/completions", timeout=60, json={
            **body, "max_tokens": 1, "stream": False, "kv_transfer_params": p_params})
        d_reply = requests.post(d.url + "/v1/completions", timeout=60,
                                json={**body, "kv_transfer_params": d_params})
        assert p_fut.result().status_code == 200
    return _tokens(d_reply)


@pytest.mark.parametrize("recompute", [False, True], ids=["from-prefill", "recompute"])
def test_first_token_paths_equal_monolithic(pair, recompute: bool) -> None:
    """Greedy and seeded sampling, prompts of 1, 16, 17 and 40 tokens: P/D == monolithic; the
    decode took the prefill's token on the first path only (a 1-token prompt moves no KV, but
    READ still hands its token over)."""
    mode, p, d = pair
    taken = metric(d.url, TAKEN)
    bodies = [_body(pr) for pr in PROMPTS]
    bodies += [_body(pr, temperature=0.9, top_p=0.95, seed=11 + i)
               for i, pr in enumerate(PROMPTS[1:])]
    for body in bodies:
        assert _pd(mode, p, d, body, recompute) == _mono(d, body), body
    moved = len(bodies) - (1 if mode == "write" else 0)  # WRITE: the 1-token prompt has no done
    expected = taken + (0 if recompute else moved)
    assert settled_metric(d.url, TAKEN, expected) == expected
    assert metric(d.url, FAILED) == 0 and metric(p.url, FAILED) == 0
    wait_clean(p.url)
    wait_clean(d.url)


def _decode_steps(mode: str, d: Instance) -> list[dict[str, Any]]:
    """The decode's step trace lines so far."""
    engine_id = info(d.url)["engine_id"]
    try:
        with open(TRACES[mode], encoding="utf-8") as f:
            return [r for r in map(json.loads, f) if r["engine_id"] == engine_id]
    except FileNotFoundError:
        return []


def test_the_decode_computes_only_the_given_token_when_the_kv_holds_the_last(pair) -> None:
    """The last prompt token's KV arrives in the block moved for the others (a 40-token prompt:
    block 2 holds tokens 32-39), so the decode's first step computes the prefill's token alone;
    a 17-token prompt's last token starts a block that is not moved, so it is computed again
    with the given token (2 tokens). Both equal monolithic."""
    mode, p, d = pair
    for prompt, first_step_tokens in ((PROMPTS[3], 1), (PROMPTS[2], 2)):
        body = _body(prompt)
        mono = _mono(d, body)
        before = len(_decode_steps(mode, d))
        assert _pd(mode, p, d, body) == mono
        steps = _decode_steps(mode, d)[before:]
        assert steps, "the decode traced no step"
        assert steps[0]["tokens"] == first_step_tokens, (prompt, steps)
        assert sum(s["tokens"] for s in steps) == first_step_tokens + len(mono) - 2, steps
    wait_clean(p.url)
    wait_clean(d.url)


def test_decode_continues_from_the_token_it_is_given(pair) -> None:
    """READ params carrying another (valid) first token: the decode emits that token and its
    continuation is the monolithic continuation of prompt + that token. Recompute, a token
    outside the vocabulary and a request for logprobs all ignore it."""
    mode, p, d = pair
    if mode != "read":
        pytest.skip("READ hands the token over in kv_transfer_params; WRITE in write_done")
    prompt = PROMPTS[3]
    body = _body(prompt)
    mono = _mono(d, body)
    forced = (mono[0] + 17) % 200 + 1
    params = {**_read_params(p, body), "first_token_id": forced}
    out = _tokens(requests.post(d.url + "/v1/completions", timeout=60,
                                json={**body, "kv_transfer_params": params}))
    assert out[0] == forced
    assert out[1:] == _mono(d, _body([*prompt, forced], max_tokens=5))
    for change in ({"recompute_first_token": True}, {"first_token_id": 10**6}):
        params = {**_read_params(p, body), "first_token_id": forced, **change}
        assert _tokens(requests.post(d.url + "/v1/completions", timeout=60,
                                     json={**body, "kv_transfer_params": params})) == mono
    params = {**_read_params(p, body), "first_token_id": forced}
    r = requests.post(d.url + "/v1/completions", timeout=60,
                      json={**body, "logprobs": 1, "kv_transfer_params": params})
    assert _tokens(r) == mono
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == len(mono)
    wait_clean(p.url)
    wait_clean(d.url)


def test_request_ended_by_its_first_token_frees_the_prefill(pair) -> None:
    """max_tokens=1: the decode answers with the prefill's token alone, reads nothing, and
    P's hold ends as a completed transfer, not a failed one."""
    mode, p, d = pair
    body = _body(PROMPTS[3], max_tokens=1)
    assert _pd(mode, p, d, body) == _mono(d, body)
    wait_clean(p.url)
    wait_clean(d.url)
    assert metric(d.url, FAILED) == 0 and metric(p.url, FAILED) == 0


def test_first_token_streams_before_the_kv_arrives(pair) -> None:
    """READ whose pull never completes: the first token reaches the client at once (well
    before the transfer deadline); the expired load is recomputed and the whole stream still
    equals monolithic."""
    mode, p, d = pair
    if mode != "read":
        pytest.skip("READ: the decode knows the token when the request arrives")
    body = _body(PROMPTS[3], max_tokens=5)
    mono = _mono(d, body)
    params = _read_params(p, body)
    r = requests.post(d.url + "/v1/kv_faults", timeout=10,
                      json={"faults": [{"at": "post", "action": "stall"}]})
    assert r.status_code == 200, r.text
    try:
        first_s, tokens = _stream_tokens(d, {**body, "kv_transfer_params": params},
                                         time.monotonic())
        assert first_s < FAST["transfer_timeout"] / 2, first_s
        assert tokens == mono
    finally:
        requests.post(d.url + "/v1/kv_faults", json={"faults": []}, timeout=10)
    wait_clean(p.url)
    wait_clean(d.url)


def _write_stream(p: Instance, d: Instance, body: dict[str, Any]) -> tuple[float, list[int]]:
    """A WRITE pair with D streamed: (seconds to D's first token, D's token ids)."""
    import concurrent.futures

    tid = uuid.uuid4().hex
    p_params = {"transfer_id": tid, "do_remote_decode": True, "mode": "write",
                **remote_of(info(d.url))}
    d_params = {"transfer_id": tid, "do_remote_prefill": True, "mode": "write",
                **remote_of(info(p.url))}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        p_fut = pool.submit(requests.post, p.url + "/v1/completions", timeout=60, json={
            **body, "max_tokens": 1, "stream": False, "kv_transfer_params": p_params})
        first_s, tokens = _stream_tokens(d, {**body, "kv_transfer_params": d_params}, started)
        assert p_fut.result().status_code == 200
    return first_s, tokens


def _stream_tokens(d: Instance, body: dict[str, Any], started: float) -> tuple[float, list[int]]:
    first_s: float | None = None
    tokens: list[int] = []
    with requests.post(d.url + "/v1/completions", stream=True, timeout=60,
                       json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            ids = (chunk["choices"][0].get("token_ids") or []) if chunk.get("choices") else []
            if ids and first_s is None:
                first_s = time.monotonic() - started
            tokens += ids
    assert first_s is not None
    return first_s, tokens


def _set_faults(url: str, rules: list[dict[str, Any]]) -> None:
    r = requests.post(url + "/v1/kv_faults", json={"faults": rules}, timeout=10)
    assert r.status_code == 200, r.text


def test_write_first_token_goes_out_before_write_done(pair) -> None:
    """WRITE: P sends its token (first_token) the moment it sampled it; with write_done held
    back 2 s the client still gets the first token at once, and the rest equals monolithic.
    With first_token lost, write_done brings the token: same output, one handover."""
    mode, p, d = pair
    if mode != "write":
        pytest.skip("READ hands the token over in kv_transfer_params")
    body = _body(PROMPTS[3], max_tokens=5)
    mono = _mono(d, body)
    taken = metric(d.url, TAKEN)
    _set_faults(p.url, [{"at": "write_done", "action": "delay", "s": 2}])
    try:
        first_s, tokens = _write_stream(p, d, body)
    finally:
        _set_faults(p.url, [])
    assert first_s < 1.5, first_s
    assert tokens == mono
    _set_faults(p.url, [{"at": "first_token", "action": "drop"}])
    try:
        assert _pd(mode, p, d, body) == mono
    finally:
        _set_faults(p.url, [])
    assert settled_metric(d.url, TAKEN, taken + 2) == taken + 2  # once per request
    assert metric(d.url, FAILED) == 0 and metric(p.url, FAILED) == 0
    wait_clean(p.url)
    wait_clean(d.url)


def _stream_events(reply: requests.Response) -> list[dict[str, Any]]:
    assert reply.status_code == 200, reply.text
    return [json.loads(line[6:]) for line in reply.text.splitlines()
            if line.startswith("data: {")]


def _text(events: list[dict[str, Any]]) -> str:
    return "".join(c["text"] for e in events for c in e.get("choices", []))


def test_decode_leaves_out_the_first_token_text_the_proxy_sent(pair) -> None:
    """READ with first_token_text (the proxy streamed P's token already): D's stream is the
    monolithic stream without that text and its usage still counts the token. A text that
    is not how D's output begins fails the request in-stream (never a stream whose text the
    client would read twice or not at all), and the engine request is freed."""
    mode, p, d = pair
    if mode != "read":
        pytest.skip("the proxy streams the prefill's token in READ only")
    body = _body(PROMPTS[3], stream=True, stream_options={"include_usage": True})
    body.pop("return_token_ids")
    mono = _stream_events(requests.post(d.url + "/v1/completions", json=body, timeout=60))
    mono_text = _text(mono)
    first = requests.post(d.url + "/v1/completions", timeout=60, json={
        **_unstreamed(body), "max_tokens": 1}).json()["choices"][0]["text"]
    assert first and mono_text.startswith(first)
    params = {**_read_params(p, body), "first_token_text": first}
    events = _stream_events(requests.post(d.url + "/v1/completions", timeout=60,
                                          json={**body, "kv_transfer_params": params}))
    assert first + _text(events) == mono_text
    assert events[-1]["usage"]["completion_tokens"] == 6
    chunks = [e for e in events if e.get("choices")]  # none for the sent token alone: the
    assert len(chunks) == len([e for e in mono if e.get("choices")]) - 1  # client has it
    for wrong in ("\u2603" + first, first + "\u2603"):
        params = {**_read_params(p, body), "first_token_text": wrong}
        reply = requests.post(d.url + "/v1/completions", timeout=60,
                              json={**body, "kv_transfer_params": params})
        if reply.status_code == 500:  # found at the first token: before the stream opened
            assert "differs from the prefill's" in reply.json()["error"]["message"]
            continue
        events = _stream_events(reply)
        assert "differs from the prefill's" in events[-1]["error"]["message"], events
        assert not (first + _text(events)).startswith(wrong)
    without_id = {k: v for k, v in _read_params(p, body).items() if k != "first_token_id"}
    reply = requests.post(d.url + "/v1/completions", timeout=60, json={
        **body, "kv_transfer_params": {**without_id, "first_token_text": first}})
    assert reply.status_code == 400 and "first_token_text" in reply.text
    wait_clean(p.url)
    wait_clean(d.url)
