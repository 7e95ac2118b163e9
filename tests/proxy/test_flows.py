"""READ, WRITE and local flows against fake instances: bodies sent, retries, aborts."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from prom_text import value

from proxy.config import PolicyName, TransferMode

PROMPT = "The capital of France is"


async def _wait_for(predicate: Any, timeout_s: float = 3.0) -> None:
    """Poll until ``predicate()`` is true; fail the test at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


async def _pd(fakes: Any, proxies: Any, mode: str = "read", num_prefill: int = 1,
              num_decode: int = 1, **cfg: Any) -> tuple[list[Any], list[Any], Any]:
    ps = [await fakes(role="kv_producer", mode=mode) for _ in range(num_prefill)]
    ds = [await fakes(role="kv_consumer", mode=mode, kv_handshake_port=18000)
          for _ in range(num_decode)]
    proxy = await proxies(prefill_urls=tuple(p.url for p in ps),
                          decode_urls=tuple(d.url for d in ds), mode=TransferMode(mode),
                          policy=PolicyName.ROUND_ROBIN, **cfg)
    return ps, ds, proxy


async def _complete(http: aiohttp.ClientSession, proxy: Any, **body: Any) -> tuple[int, Any]:
    payload = {"model": "m", "prompt": PROMPT, "max_tokens": 5, **body}
    async with http.post(proxy.url + "/v1/completions", json=payload) as resp:
        return resp.status, await resp.json()


async def test_read_flow_sends_the_right_bodies(fakes: Any, proxies: Any, http: Any,
                                                fake_instance_module: Any) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies)
    status, body = await _complete(http, proxy, temperature=0.0)
    assert status == 200
    expected = "".join(fake_instance_module.generated_tokens(PROMPT, 5))
    assert body["choices"][0]["text"] == expected  # D computed every token itself
    assert "kv_transfer_params" not in body  # internal: the client sees a monolithic answer
    (p_body,), (d_body,) = p.requests, d.requests
    assert p_body["max_tokens"] == 1 and p_body["stream"] is False
    transfer_id = p_body["kv_transfer_params"]["transfer_id"]
    assert p_body["kv_transfer_params"] == {"transfer_id": transfer_id,
                                            "do_remote_decode": True, "mode": "read",
                                            "decode_max_tokens": 5,  # the client's
                                            "decode_max_model_len": 2048}  # the decode's
    assert d_body["max_tokens"] == 5 and d_body["temperature"] == 0.0
    kv = d_body["kv_transfer_params"]
    assert kv["transfer_id"] == transfer_id and kv["do_remote_prefill"] is True
    assert kv["mode"] == "read" and kv["remote_engine_id"] == p.engine_id
    assert kv["remote_block_ids"] == [1, 2, 3] and kv["remote_num_tokens"] == 40
    assert p.aborts == [] and d.aborts == []


async def test_read_flow_streams_the_decode_output(fakes: Any, proxies: Any, http: Any,
                                                   fake_instance_module: Any) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies)
    payload = {"model": "m", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    async with http.post(proxy.url + "/v1/completions", json=payload) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    tokens = fake_instance_module.generated_tokens(PROMPT, 4)
    texts = _texts(raw)
    # the proxy's chunk with the prefill's token, then the decode's four (its first emptied)
    assert texts == [tokens[0], "", *tokens[1:]]
    assert p.requests[0]["stream"] is False and d.requests[0]["stream"] is True
    kv = d.requests[0]["kv_transfer_params"]
    assert kv["first_token_id"] == fake_instance_module.FIRST_TOKEN_ID
    assert kv["first_token_text"] == tokens[0]


def _texts(raw: str) -> list[str]:
    """The text of each completion chunk of a raw SSE body."""
    return [c["text"] for line in raw.splitlines() if line.startswith("data: {")
            for c in json.loads(line[6:]).get("choices", [])]


async def _stream_raw(http: aiohttp.ClientSession, proxy: Any, **body: Any) -> str:
    payload = {"model": "m", "prompt": PROMPT, "max_tokens": 4, "stream": True, **body}
    async with http.post(proxy.url + "/v1/completions", json=payload) as resp:
        assert resp.status == 200
        return (await resp.read()).decode()


@pytest.mark.parametrize("body", [
    {"stop": ["xyz"]}, {"stop": "xyz"}, {"logprobs": 1}, {"logprobs": 0},
    {"include_stop_str_in_output": True},
    {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}],
    ids=["stops", "stop", "logprobs", "logprobs-0", "include-stop", "continuous-usage"])
async def test_requests_the_prefill_token_may_not_match_take_the_decode_path(
        fakes: Any, proxies: Any, http: Any, fake_instance_module: Any,
        body: dict[str, Any]) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies)
    payload = {"model": "m", "prompt": PROMPT, "max_tokens": 4, "stream": True, **body}
    async with http.post(proxy.url + "/v1/completions", json=payload) as resp:
        raw = (await resp.read()).decode()
    assert _texts(raw) == fake_instance_module.generated_tokens(PROMPT, 4)
    assert "first_token_text" not in d.requests[0]["kv_transfer_params"]


async def test_a_decode_failing_after_the_first_token_ends_the_stream_with_an_error(
        fakes: Any, proxies: Any, http: Any, fake_instance_module: Any) -> None:
    """The client has its first token (status 200, first chunk): no decode can continue, so
    the stream ends with an OpenAI-style error event, and P's KV is released."""
    (p,), (d,), proxy = await _pd(fakes, proxies)
    d.behavior.fail_status = 500
    raw = await _stream_raw(http, proxy)
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["text"] == fake_instance_module.generated_tokens(PROMPT, 4)[0]
    assert events[-1]["error"]["code"] == 502 and "decode failed" in events[-1]["error"]["message"]
    assert "[DONE]" not in raw
    await _wait_for(lambda: len(p.aborts) == 1)


async def test_a_prefill_retried_after_the_first_token_hands_over_its_kv_not_its_token(
        fakes: Any, proxies: Any, http: Any, fake_instance_module: Any) -> None:
    """No decode can read p1's KV after the proxy streamed p1's token: the prompt is prefilled
    again on p2, and the decode continues from p1's token (the one the client has)."""
    (p1, p2), (d,), proxy = await _pd(fakes, proxies, num_prefill=2)
    d.behavior.fail_for_engine = p1.engine_id
    raw = await _stream_raw(http, proxy)
    tokens = fake_instance_module.generated_tokens(PROMPT, 4)
    assert _texts(raw) == [tokens[0], "", *tokens[1:]]  # the first token exactly once
    first, second = (r["kv_transfer_params"] for r in d.requests)
    assert first["remote_engine_id"] == p1.engine_id
    assert second["remote_engine_id"] == p2.engine_id
    assert second["first_token_text"] == first["first_token_text"] == tokens[0]


async def test_write_flow_sends_to_both_at_once_with_peer_addresses(fakes: Any, proxies: Any,
                                                                    http: Any) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies, mode="write")
    p.behavior.hang_s = 0.5  # P is slow; D must already have its request
    request = asyncio.ensure_future(_complete(http, proxy))
    await _wait_for(lambda: len(d.requests) == 1 and len(p.requests) == 1, timeout_s=0.4)
    status, _ = await request
    assert status == 200
    pk, dk = p.requests[0]["kv_transfer_params"], d.requests[0]["kv_transfer_params"]
    assert pk["transfer_id"] == dk["transfer_id"]
    assert pk == {"transfer_id": pk["transfer_id"], "do_remote_decode": True, "mode": "write",
                  "remote_engine_id": d.engine_id, "remote_host": "127.0.0.1",
                  "remote_handshake_port": 18000, "remote_notify_port": 18001,
                  "decode_max_tokens": 5, "decode_max_model_len": 2048}
    assert dk == {"transfer_id": pk["transfer_id"], "do_remote_prefill": True, "mode": "write",
                  "remote_engine_id": p.engine_id, "remote_host": "127.0.0.1",
                  "remote_handshake_port": 17000, "remote_notify_port": 17001}
    assert p.requests[0]["max_tokens"] == 1 and d.requests[0]["max_tokens"] == 5


@pytest.mark.parametrize("failure", ["status", "drop", "no_params"])
async def test_prefill_failure_is_retried_on_another_prefill(fakes: Any, proxies: Any,
                                                             http: Any, failure: str) -> None:
    (p1, p2), (d,), proxy = await _pd(fakes, proxies, num_prefill=2)
    if failure == "status":
        p1.behavior.fail_status = 503
    elif failure == "drop":
        p1.behavior.drop_connection = True
    else:
        p1.behavior.omit_kv_params = True
    status, _ = await _complete(http, proxy)
    assert status == 200
    first = p1.requests[0]["kv_transfer_params"]["transfer_id"]
    second = p2.requests[0]["kv_transfer_params"]["transfer_id"]
    assert first != second
    assert d.requests[0]["kv_transfer_params"]["transfer_id"] == second
    await _wait_for(lambda: p1.aborts == [first])
    assert proxy.state.metrics.retries["prefill"] == 1


async def test_every_prefill_failing_gives_a_502(fakes: Any, proxies: Any, http: Any) -> None:
    (p1, p2), (d,), proxy = await _pd(fakes, proxies, num_prefill=2)
    p1.behavior.fail_status = p2.behavior.fail_status = 500
    status, body = await _complete(http, proxy)
    assert status == 502 and body["error"]["type"] == "upstream_error"
    assert "prefill failed on 2 instance(s)" in body["error"]["message"]
    assert d.requests == []
    await _wait_for(lambda: len(p1.aborts) == 1 and len(p2.aborts) == 1)


async def test_empty_pool_gives_a_503(proxies: Any, http: Any) -> None:
    proxy = await proxies(decode_urls=("http://127.0.0.1:9",))  # nothing listens there
    status, body = await _complete(http, proxy)
    assert status == 503
    assert body["error"]["message"] == "no healthy prefill instance available"
    assert body["error"]["code"] == 503


async def test_no_decode_after_a_prefill_aborts_the_prefill(fakes: Any, proxies: Any,
                                                            http: Any) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies)
    d.behavior.fail_status = 500
    status, body = await _complete(http, proxy)
    assert status == 502 and "decode failed" in body["error"]["message"]
    transfer_id = p.requests[0]["kv_transfer_params"]["transfer_id"]
    await _wait_for(lambda: p.aborts == [transfer_id] and d.aborts == [transfer_id])


async def test_read_decode_failure_is_retried_with_the_same_kv(fakes: Any, proxies: Any,
                                                               http: Any) -> None:
    (p,), (d1, d2), proxy = await _pd(fakes, proxies, num_decode=2)
    d1.behavior.fail_status = 500
    status, _ = await _complete(http, proxy)
    assert status == 200
    assert len(p.requests) == 1  # no second prefill: P still holds the KV
    assert d1.requests[0]["kv_transfer_params"] == d2.requests[0]["kv_transfer_params"]
    await asyncio.sleep(0.1)
    assert p.aborts == []  # the KV was consumed by d2; nothing to abort


async def test_unusable_kv_is_prefilled_again_on_another_prefill(fakes: Any, proxies: Any,
                                                                 http: Any) -> None:
    (p1, p2), (d,), proxy = await _pd(fakes, proxies, num_prefill=2)
    d.behavior.fail_for_engine = p1.engine_id  # D cannot read KV from p1
    status, body = await _complete(http, proxy)
    assert status == 200, body
    first = p1.requests[0]["kv_transfer_params"]["transfer_id"]
    assert [r["kv_transfer_params"]["remote_engine_id"] for r in d.requests] == \
        [p1.engine_id, p2.engine_id]
    await _wait_for(lambda: p1.aborts == [first])
    assert p2.aborts == [] and proxy.state.metrics.retries["prefill"] == 1


async def test_decode_refusal_reaches_the_client_and_frees_the_prefill(
        fakes: Any, proxies: Any, http: Any) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies)
    d.behavior.fail_status = 400
    status, body = await _complete(http, proxy)
    assert status == 400 and body["error"]["message"] == "fake failure"
    assert len(d.requests) == 1  # a refusal is not retried
    await _wait_for(lambda: len(p.aborts) == 1)


async def test_short_prompts_go_to_decode_alone(fakes: Any, proxies: Any, http: Any) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies, local_prefill_threshold_tokens=10,
                                  model="builtin:tiny-llama")
    assert (await _complete(http, proxy, prompt="hi"))[0] == 200  # 3 tokens
    assert p.requests == [] and "kv_transfer_params" not in d.requests[0]
    assert (await _complete(http, proxy, prompt="a much longer prompt"))[0] == 200
    assert len(p.requests) == 1 and "kv_transfer_params" in d.requests[1]
    assert proxy.state.metrics.local_prefills == 1


async def test_write_prefill_failure_aborts_decode_and_retries(fakes: Any, proxies: Any,
                                                               http: Any) -> None:
    (p1, p2), (d,), proxy = await _pd(fakes, proxies, mode="write", num_prefill=2)
    p1.behavior.fail_status = 500
    d.behavior.hang_s = 0.3  # D waits for its KV, as a real one would
    status, _ = await _complete(http, proxy)
    assert status == 200
    first, second = (r["kv_transfer_params"]["transfer_id"] for r in d.requests)
    assert p1.requests[0]["kv_transfer_params"]["transfer_id"] == first
    assert p2.requests[0]["kv_transfer_params"]["transfer_id"] == second
    await _wait_for(lambda: d.aborts == [first] and p1.aborts == [first])
    assert p2.aborts == []


async def test_a_write_prefill_failing_because_the_decode_gave_up_waits_for_the_decode(
        fakes: Any, proxies: Any, http: Any) -> None:
    """The decode failed the transfer (it expired the request in its queue, say) and settles
    the request itself: with kv_load_failure_policy=recompute it computes the prompt and its
    answer is the request's; the proxy neither aborts it nor retries the pair."""
    (p1, p2), (d,), proxy = await _pd(fakes, proxies, mode="write", num_prefill=2)
    p1.behavior.fail_status, p1.behavior.fail_code = 500, "kv_transfer_failed"
    d.behavior.hang_s = 0.3
    status, body = await _complete(http, proxy)
    assert status == 200 and body["choices"][0]["text"]
    assert len(d.requests) == 1 and p2.requests == []
    await asyncio.sleep(0.1)
    assert d.aborts == []


async def test_a_write_decode_failing_after_the_prefill_gave_way_is_retried(
        fakes: Any, proxies: Any, http: Any) -> None:
    """Its decode failing too (kv_load_failure_policy=fail), the pair is retried as any
    failed decode is: on another decode, which answers."""
    (p,), (d1, d2), proxy = await _pd(fakes, proxies, mode="write", num_decode=2)
    p.behavior.fail_status, p.behavior.fail_code = 500, "kv_transfer_failed"
    d1.behavior.hang_s, d1.behavior.fail_status = 0.3, 500
    d2.behavior.hang_s = 0.3
    status, _ = await _complete(http, proxy)
    assert status == 200
    assert len(d1.requests) == len(d2.requests) == 1 and len(p.requests) == 2
    first = d1.requests[0]["kv_transfer_params"]["transfer_id"]
    await _wait_for(lambda: first in d1.aborts and first in p.aborts)


async def test_a_decode_failing_for_want_of_a_broken_write_prefills_kv_retries_another_prefill(
        fakes: Any, proxies: Any, http: Any) -> None:
    """P1's transfers fail and the decode (policy fail) then fails, for want of that KV, every
    request whose KV was to come from P1: P1 is the one that failed, so the retry goes to P2
    (blaming the decode spent its budget with P1 in the pair again: a 502)."""
    (p1, p2), (d,), proxy = await _pd(fakes, proxies, mode="write", num_prefill=2)
    p1.behavior.fail_status, p1.behavior.fail_code = 500, "kv_transfer_failed"
    d.behavior.hang_s = 0.3
    d.behavior.fail_for_engine = p1.engine_id
    status, body = await _complete(http, proxy)
    assert status == 200, body
    assert len(p1.requests) == len(p2.requests) == 1 and len(d.requests) == 2


async def test_a_decode_failing_for_want_of_a_frozen_write_prefills_kv_retries_another(
        fakes: Any, proxies: Any, http: Any) -> None:
    """P1 is frozen (it never answers) and the decode, policy fail, gives its transfer up:
    the pair failed for want of P1's KV, so the retry goes to P2 (it was a 502 naming the
    decode, the only one)."""
    (p1, p2), (d,), proxy = await _pd(fakes, proxies, mode="write", num_prefill=2)
    p1.behavior.hang_s = 30
    d.behavior.hang_s = 0.3
    d.behavior.fail_for_engine = p1.engine_id
    status, body = await _complete(http, proxy)
    assert status == 200, body
    assert len(p1.requests) == len(p2.requests) == 1 and len(d.requests) == 2
    first = p1.requests[0]["kv_transfer_params"]["transfer_id"]
    await _wait_for(lambda: first in p1.aborts and first in d.aborts)


async def test_write_decode_failure_aborts_prefill(fakes: Any, proxies: Any,
                                                   http: Any) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies, mode="write")
    p.behavior.hang_s = 0.3
    d.behavior.fail_status = 500
    status, body = await _complete(http, proxy)
    assert status == 502 and "decode failed on 1" in body["error"]["message"]
    transfer_id = p.requests[0]["kv_transfer_params"]["transfer_id"]
    await _wait_for(lambda: p.aborts == [transfer_id] and d.aborts == [transfer_id])


@pytest.mark.parametrize("mode", ["read", "write"])
async def test_client_disconnect_mid_stream_aborts_both(fakes: Any, proxies: Any,
                                                        mode: str) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies, mode=mode)
    d.behavior.token_delay_s = 0.05
    payload = {"model": "m", "prompt": PROMPT, "max_tokens": 200, "stream": True}
    async with aiohttp.ClientSession() as client, \
            client.post(proxy.url + "/v1/completions", json=payload) as resp:
        assert resp.status == 200
        seen = b""
        while seen.count(b"data: ") < 3:  # the decode's tokens flow (READ: after the proxy's)
            chunk = await resp.content.readany()
            assert chunk
            seen += chunk
        assert seen.startswith(b"data: ")
    # The client is gone; the proxy must tell both instances to let go of the KV.
    transfer_id = d.requests[0]["kv_transfer_params"]["transfer_id"]
    await _wait_for(lambda: p.aborts == [transfer_id] and d.aborts == [transfer_id])
    await _wait_for(lambda: proxy.state.metrics.in_flight == 0 and d.disconnects == 1)
    assert all(i.outstanding_requests == 0
                              for i in proxy.state.registry.instances())


async def test_client_disconnect_while_waiting_aborts_both(fakes: Any, proxies: Any) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies)
    d.behavior.hang_s = 5.0
    payload = {"model": "m", "prompt": PROMPT, "max_tokens": 5}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as client:
        with pytest.raises(asyncio.TimeoutError):
            async with client.post(proxy.url + "/v1/completions", json=payload) as resp:
                await resp.read()
    transfer_id = p.requests[0]["kv_transfer_params"]["transfer_id"]
    await _wait_for(lambda: p.aborts == [transfer_id] and d.aborts == [transfer_id])


async def test_a_decode_stream_ending_without_done_ends_with_an_error_event(
        fakes: Any, proxies: Any, http: Any) -> None:
    """A clean end of the upstream stream with no [DONE] is a truncated answer: the client
    gets an error event, not a stream it would take as complete."""
    (p,), (d,), proxy = await _pd(fakes, proxies)
    d.behavior.end_without_done = True
    payload = {"model": "m", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    async with http.post(proxy.url + "/v1/completions", json=payload) as resp:
        raw = (await resp.read()).decode()
    assert "data: [DONE]" not in raw and '"error"' in raw and "without [DONE]" in raw, raw


async def test_decode_dying_mid_stream_ends_with_an_error_event(fakes: Any, proxies: Any,
                                                                http: Any) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies)
    d.behavior.drop_after_events = 2
    payload = {"model": "m", "prompt": PROMPT, "max_tokens": 10, "stream": True}
    async with http.post(proxy.url + "/v1/completions", json=payload) as resp:
        raw = (await resp.read()).decode()
    assert raw.count("tok") == 2 and "[DONE]" not in raw
    assert '"error"' in raw and "failed mid-stream" in raw
    transfer_id = p.requests[0]["kv_transfer_params"]["transfer_id"]
    await _wait_for(lambda: p.aborts == [transfer_id] and d.aborts == [transfer_id])


@pytest.mark.parametrize("mode", ["read", "write"])
async def test_n_choices_are_one_flow_each_merged_into_one_answer(
        fakes: Any, proxies: Any, http: Any, mode: str) -> None:
    """n = 3: three flows, each with n = 1, its own transfer and seed + i; one answer with
    choices 0-2 and the usage of an instance's n = 3 (the prompt once)."""
    (p,), (d,), proxy = await _pd(fakes, proxies, mode)
    status, body = await _complete(http, proxy, n=3, seed=7, best_of=3)
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 15, "total_tokens": 18}
    assert sorted(r["seed"] for r in d.requests) == [7, 8, 9]
    assert all(r["n"] == 1 and "best_of" not in r for r in p.requests + d.requests)
    assert len({r["kv_transfer_params"]["transfer_id"] for r in d.requests}) == 3
    async with http.post(proxy.url + "/v1/completions", json={
            "model": "m", "prompt": PROMPT, "max_tokens": 4, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}) as resp:
        assert resp.status == 200
        events = [json.loads(line[6:]) for line in (await resp.text()).splitlines()
                  if line.startswith("data: {")]
        assert (await resp.text()).count("data: [DONE]") == 1
    assert {c["index"] for e in events for c in e["choices"]} == {0, 1}
    assert len({e["id"] for e in events}) == 1  # one answer, one id (as an instance's)
    usage = [e for e in events if not e["choices"]]
    assert len(usage) == 1 and usage[0]["usage"]["completion_tokens"] == 8
    assert usage[0]["usage"]["prompt_tokens"] == 3
    # each of the two requests is one sample of first byte and of TTFT (not one per choice)
    async with http.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    for family in ("disagg_proxy_time_to_first_byte_seconds_count",
                   "disagg_proxy_time_to_first_token_seconds_count"):
        assert value(text, family) == 2, family


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failing_choice_fails_the_request_and_aborts_every_choice(
        fakes: Any, proxies: Any, http: Any, stream: bool) -> None:
    """The decode fails every choice (before a byte, or mid-stream): one error, and every
    choice's transfer is aborted on the prefill; no [DONE] after a broken stream."""
    (p,), (d,), proxy = await _pd(fakes, proxies, "read", max_decode_attempts=1)
    if stream:
        d.behavior.drop_after_events = 2
    else:
        d.behavior.fail_status = 500
    async with http.post(proxy.url + "/v1/completions", json={
            "model": "m", "prompt": PROMPT, "max_tokens": 8, "n": 3,
            "stream": stream}) as resp:
        text = await resp.text()
    if stream:
        assert resp.status == 200 and '"error"' in text and "[DONE]" not in text, text
    else:
        assert resp.status >= 500, text
    await _wait_for(lambda: len(p.aborts) == 3)
    assert len({a for a in p.aborts}) == 3


async def test_a_client_leaving_an_n_choice_stream_aborts_every_choice(
        fakes: Any, proxies: Any, http: Any) -> None:
    (p,), (d,), proxy = await _pd(fakes, proxies, "read")
    d.behavior.token_delay_s = 0.2
    resp = await http.post(proxy.url + "/v1/completions", json={
        "model": "m", "prompt": PROMPT, "max_tokens": 50, "n": 3, "stream": True})
    assert resp.status == 200
    await resp.content.readline()  # the first event: every choice's stream is open
    resp.close()
    await _wait_for(lambda: len(p.aborts) == 3)
    await _wait_for(lambda: proxy.state.metrics.in_flight == 0)


async def test_a_batch_of_prompts_is_one_flow_per_prompt_and_choice(
        fakes: Any, proxies: Any, http: Any) -> None:
    """A batched /v1/completions: prompt p's choice i is answer choice p * n + i, each its own
    flow with that prompt alone; the usage counts each prompt once."""
    (p,), (d,), proxy = await _pd(fakes, proxies, "read")
    status, body = await _complete(http, proxy, prompt=["one", "two", [7, 8]], n=2, seed=3)
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert sorted(map(str, (r["prompt"] for r in d.requests))) == sorted(
        ["one", "one", "two", "two", "[7, 8]", "[7, 8]"])
    assert sorted(r["seed"] for r in d.requests) == [3, 3, 3, 4, 4, 4]
    assert body["usage"]["prompt_tokens"] == 9  # the fake counts 3 a prompt
    assert body["usage"]["completion_tokens"] == 30


async def test_clients_closing_right_after_done_leave_no_load_counted(
        fakes: Any, proxies: Any, http: Any) -> None:
    """The openai client closes the stream as soon as it reads [DONE]: the handler may be
    cancelled while it settles the choices, and every choice's load must still be released
    and the request counted as answered."""
    (p,), (d,), proxy = await _pd(fakes, proxies, "read")

    async def one(i: int) -> None:
        async with http.post(proxy.url + "/v1/completions", json={
                "model": "m", "prompt": PROMPT, "max_tokens": 4, "n": 3, "seed": i,
                "stream": True}) as resp:
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    resp.close()  # at once, as the SDK does
                    return

    await asyncio.gather(*(one(i) for i in range(24)))
    registry = proxy.state.registry
    await _wait_for(lambda: proxy.state.metrics.in_flight == 0)
    await _wait_for(lambda: all(i.outstanding_requests == 0 for i in registry.instances()))


@pytest.mark.parametrize("stream", [False, True])
async def test_read_prefills_nothing_while_no_decode_could_take_the_kv(
        fakes: Any, proxies: Any, http: Any, stream: bool) -> None:
    """The only decode is down: a READ request is a 503 before any prefill (it was prefilled
    in vain and, streamed, answered 200 with the prefill's token and then an error)."""
    (p,), (d,), proxy = await _pd(fakes, proxies, unhealthy_after_failures=1,
                                  health_check_interval_s=60.0)
    await d.stop()
    proxy.state.registry.mark_failed(proxy.state.registry.get(d.url), "down")
    payload = {"model": "m", "prompt": PROMPT, "max_tokens": 5, "stream": stream}
    async with http.post(proxy.url + "/v1/completions", json=payload) as resp:
        assert resp.status == 503, await resp.text()
        assert "no healthy decode instance" in (await resp.json())["error"]["message"]
    assert p.requests == []


async def test_read_round_robin_still_alternates_decodes(fakes: Any, proxies: Any,
                                                         http: Any) -> None:
    (p,), (d1, d2), proxy = await _pd(fakes, proxies, num_decode=2)
    for _ in range(4):
        assert (await _complete(http, proxy))[0] == 200
    assert len(d1.requests) == len(d2.requests) == 2
