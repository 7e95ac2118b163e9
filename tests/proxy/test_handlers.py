"""The public HTTP surface: models, health, metrics, errors, and the official openai client."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import openai
import pytest
from prom_text import value
from support import MALFORMED_HTTP, assert_malformed_answer, raw_http

from proxy.config import PolicyName, TransferMode

PROMPT = "Once upon a time"


async def _pd(fakes: Any, proxies: Any, **cfg: Any) -> tuple[Any, Any, Any]:
    p = await fakes(role="kv_producer", max_model_len=4096)
    d = await fakes(role="kv_consumer", max_model_len=1024)
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,), **cfg)
    return p, d, proxy


async def test_models_reports_the_smallest_max_model_len(fakes: Any, proxies: Any,
                                                         http: Any) -> None:
    _, _, proxy = await _pd(fakes, proxies)
    async with http.get(proxy.url + "/v1/models") as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "builtin:tiny-llama"
    assert body["data"][0]["max_model_len"] == 1024


async def test_models_and_health_are_503_without_instances(proxies: Any, http: Any) -> None:
    proxy = await proxies(prefill_urls=("http://127.0.0.1:9",))
    async with http.get(proxy.url + "/v1/models") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["type"] == "service_unavailable_error"
    async with http.get(proxy.url + "/health") as resp:
        assert resp.status == 503
        assert await resp.json() == {"status": "unavailable", "prefill": 0, "decode": 0}


async def test_health_is_200_with_both_pools(fakes: Any, proxies: Any, http: Any) -> None:
    _, _, proxy = await _pd(fakes, proxies)
    async with http.get(proxy.url + "/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "prefill": 1, "decode": 1}


async def test_metrics_count_requests_and_show_instances(fakes: Any, proxies: Any,
                                                         http: Any) -> None:
    _, d, proxy = await _pd(fakes, proxies)
    async with http.post(proxy.url + "/v1/completions",
                         json={"model": "m", "prompt": PROMPT}) as resp:
        assert resp.status == 200
    async with http.post(proxy.url + "/v1/completions", json={"model": "m"}) as resp:
        assert resp.status == 400
    async with http.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    requests = "disagg_proxy_requests_total"
    assert value(text, requests, route="/v1/completions", outcome="ok") == 1
    assert value(text, requests, route="/v1/completions", outcome="rejected") == 1
    assert value(text, "disagg_proxy_instance_healthy", pool="decode", url=d.url) == 1
    assert value(text, "disagg_proxy_time_to_first_byte_seconds_count") == 1
    assert value(text, "disagg_proxy_requests_in_flight") == 0


async def test_oversized_bodies_get_an_openai_error(fakes: Any, proxies: Any,
                                                    http: Any) -> None:
    _, _, proxy = await _pd(fakes, proxies, max_request_body_bytes=1024)
    async with http.post(proxy.url + "/v1/completions",
                         json={"model": "m", "prompt": "x" * 4096}) as resp:
        assert resp.status == 413
        assert "limit of 1024 bytes" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_not_in_its_content_encoding_is_a_400(fakes: Any, proxies: Any, http: Any,
                                                           encoding: str) -> None:
    p, d, proxy = await _pd(fakes, proxies)
    async with http.post(proxy.url + "/v1/completions", data=b'{"prompt": "x"}', headers={
            "Content-Type": "application/json", "Content-Encoding": encoding}) as resp:
        assert resp.status == 400
        assert "cannot read the request body" in (await resp.json())["error"]["message"]
    assert p.aborts == [] and d.aborts == []


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("frozen", ["decode", "prefill"])
async def test_requests_waiting_on_a_frozen_instance_fail_once_its_probes_do(
        fakes: Any, proxies: Any, http: Any, frozen: str, stream: bool) -> None:
    """An instance that stops answering (a stopped process) leaves the rotation after its
    probes fail; the requests already waiting on it then fail with a clear 5xx at once,
    not at their own deadline (an hour for a non-streamed answer, minutes before a first
    byte)."""
    import asyncio
    import time

    p, d, proxy = await _pd(fakes, proxies, health_check_interval_s=0.1, probe_timeout_s=0.2,
                            unhealthy_after_failures=2)
    async with http.get(proxy.url + "/health") as resp:
        assert resp.status == 200
    (d if frozen == "decode" else p).behavior.frozen = True
    started = time.monotonic()
    async with asyncio.timeout(10):
        async with http.post(proxy.url + "/v1/completions", json={
                "prompt": "hello", "max_tokens": 3, "stream": stream}) as resp:
            status, text = resp.status, await resp.text()
    if status == 200:  # a READ stream answered with the prefill's first token already
        assert stream and frozen == "decode" and '"error"' in text, text
    else:
        assert status in (502, 503), text
    assert "stopped answering its health checks" in text or "no healthy" in text, text
    assert "[DONE]" not in text
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("n", [1, 2])
async def test_a_stream_from_a_decode_that_froze_mid_way_ends_once_it_is_given_up(
        fakes: Any, proxies: Any, http: Any, n: int) -> None:
    """The decode froze after its first tokens went out: once its probes fail (it is given
    up) the stream ends with an error event naming that, and no [DONE], instead of waiting
    out the stream's idle timeout (two minutes here)."""
    import asyncio
    import time

    p, d, proxy = await _pd(fakes, proxies, health_check_interval_s=0.1, probe_timeout_s=0.2,
                            unhealthy_after_failures=2, stream_idle_timeout_s=120.0)
    d.behavior.token_delay_s = 0.05
    body = {"prompt": "hello", "max_tokens": 40, "stream": True, "n": n}
    async with asyncio.timeout(10):
        async with http.post(proxy.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            events = 0
            while events < 3:  # past the prefill's token (READ): the decode's stream runs
                line = await resp.content.readline()
                assert line and b"[DONE]" not in line, line
                events += line.startswith(b"data: {")
            d.behavior.frozen = True
            started = time.monotonic()
            rest = (await resp.read()).decode()
    assert time.monotonic() - started < 5
    assert "stopped answering its health checks mid-stream" in rest, rest
    assert "[DONE]" not in rest


@pytest.mark.parametrize(("text", "status"), [("plain bad", 400), ("", 413)])
async def test_an_upstream_refusal_in_another_shape_is_worded_openai_style(
        fakes: Any, proxies: Any, http: Any, text: str, status: int) -> None:
    """A refusal whose body is not an OpenAI-style error (a plain page, nothing) reaches the
    client with the same status and an OpenAI-style body naming what the instance said; an
    instance's own error body goes through as it was."""
    p, d, proxy = await _pd(fakes, proxies)
    p.behavior.fail_status, p.behavior.fail_text = status, text
    async with http.post(proxy.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == status
        err = (await resp.json())["error"]
    assert err["message"] == f"an instance refused the request: {text or f'HTTP {status}'}"
    p.behavior.fail_text = None
    async with http.post(proxy.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == status and (await resp.json())["error"]["message"] == \
            "fake failure"


@pytest.mark.parametrize(("pool", "upstream", "client"), [
    ("prefill", 429, 429), ("decode", 429, 429), ("decode", 503, 503), ("prefill", 500, 502)])
async def test_overloaded_instances_are_reported_as_such(fakes: Any, proxies: Any, http: Any,
                                                         pool: str, upstream: int,
                                                         client: int) -> None:
    """When every instance tried answered 429 (or 503), the client gets that status (back
    off and retry later), not a 502 as for an instance that failed."""
    p, d, proxy = await _pd(fakes, proxies)
    (p if pool == "prefill" else d).behavior.fail_status = upstream
    async with http.post(proxy.url + "/v1/completions", json={"prompt": "x"}) as resp:
        assert resp.status == client
        assert f"HTTP {upstream}" in (await resp.json())["error"]["message"]


async def test_unknown_routes_and_methods_get_openai_errors(proxies: Any, http: Any) -> None:
    proxy = await proxies(decode_urls=("http://127.0.0.1:9",))
    async with http.get(proxy.url + "/v1/nothing") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found_error"
    async with http.get(proxy.url + "/v1/completions") as resp:
        assert resp.status == 405
        assert "GET /v1/completions" in (await resp.json())["error"]["message"]
    for case, data in MALFORMED_HTTP.items():  # refused by aiohttp's parser, before any route
        answer = await asyncio.to_thread(raw_http, proxy.url, data)
        assert_malformed_answer(*answer), case


@pytest.mark.parametrize("mode", ["read", "write"])
async def test_openai_client_completions_chat_and_streaming(fakes: Any, proxies: Any,
                                                            fake_instance_module: Any,
                                                            mode: str) -> None:
    p = await fakes(role="kv_producer", mode=mode)
    d = await fakes(role="kv_consumer", mode=mode)
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,),
                          mode=TransferMode(mode), policy=PolicyName.LEAST_LOADED)
    expected = "".join(fake_instance_module.generated_tokens(PROMPT, 6))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused",
                                  max_retries=0) as client:
        completion = await client.completions.create(model="m", prompt=PROMPT, max_tokens=6)
        assert completion.choices[0].text == expected
        stream = await client.completions.create(model="m", prompt=PROMPT, max_tokens=6,
                                                 stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
        messages: Any = [{"role": "user", "content": PROMPT}]
        chat = await client.chat.completions.create(model="m", messages=messages, max_tokens=3)
        assert chat.choices[0].message.content is not None
        chat_stream = await client.chat.completions.create(model="m", messages=messages,
                                                           max_tokens=3, stream=True)
        pieces = [c.choices[0].delta.content async for c in chat_stream if c.choices]
        assert "".join(p or "" for p in pieces) == chat.choices[0].message.content
        batch = await client.completions.create(model="m", prompt=["a", "b"], max_tokens=2)
        assert [c.index for c in batch.choices] == [0, 1]
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model="m", prompt=cast(Any, ["a", ["b"]]),
                                            max_tokens=2)
        served = (await client.models.list()).data[0].id
        assert (await client.models.retrieve(served)).id == served
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("org/another-model")
    assert len(p.requests) == 6 and len(d.requests) == 6
    assert all(r["max_tokens"] == 1 and r["stream"] is False for r in p.requests)


async def test_model_cards_list_and_retrieve_every_served_name(fakes: Any,
                                                              proxies: Any) -> None:
    """An instance served as ``--served-model-name main alias`` answers to both names: the
    proxy lists both cards and retrieves either, and 404s any other name."""
    names = {"model": "org/main", "model_aliases": ("alias",), "model_root": "/models/main"}
    p = await fakes(role="kv_producer", mode="read", **names)
    d = await fakes(role="kv_consumer", mode="read", **names)
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused",
                                  max_retries=0) as client:
        cards = (await client.models.list()).data
        assert [m.id for m in cards] == ["org/main", "alias"]
        assert [getattr(m, "root", None) for m in cards] == ["/models/main"] * 2  # as theirs
        assert (await client.models.retrieve("alias")).id == "alias"
        assert (await client.models.retrieve("org/main")).id == "org/main"
        with pytest.raises(openai.NotFoundError, match="serves `org/main`") as info:
            await client.models.retrieve("org/another-model")
        assert info.value.code == "model_not_found" and info.value.param == "model"
        assert info.value.type == "invalid_request_error"  # as OpenAI and the instances say


async def test_tokenize_goes_to_a_decode_instance_and_version_is_the_proxys(
        fakes: Any, proxies: Any, http: Any) -> None:
    p = await fakes(role="kv_producer", mode="read")
    d = await fakes(role="kv_consumer", mode="read")
    proxy = await proxies(prefill_urls=(p.url,), decode_urls=(d.url,))
    async with http.post(proxy.url + "/tokenize", json={"prompt": "hi"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"tokens": [104, 105], "count": 2,
                                     "engine_id": d.engine_id}
    async with http.post(proxy.url + "/tokenize", json={"messages": []}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "prompt"
    async with http.get(proxy.url + "/version") as resp:
        assert resp.status == 200 and (await resp.json())["version"]
    empty = await proxies(decode_urls=("http://127.0.0.1:9",))
    async with http.post(empty.url + "/tokenize", json={"prompt": "hi"}) as resp:
        assert resp.status == 503 and (await resp.json())["error"]["message"]


async def test_a_client_closing_after_done_is_ok_and_aborts_nothing(fakes: Any, proxies: Any,
                                                                    http: Any) -> None:
    """The openai client closes its socket once it reads ``data: [DONE]``, before the end of
    the chunked body: the request is complete, so it counts as ok and nothing is aborted
    (it used to count as client_gone and abort both instances' transfers)."""
    import asyncio
    from urllib.parse import urlsplit

    p, d, proxy = await _pd(fakes, proxies)
    d.behavior.linger_after_done_s = 0.5  # the proxy relays [DONE], then waits for the end
    url = urlsplit(proxy.url)
    body = b'{"prompt": "Once upon a time", "max_tokens": 3, "stream": true}'
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    seen = b""
    async with asyncio.timeout(10):
        while b"data: [DONE]" not in seen:
            chunk = await reader.read(4096)
            assert chunk, seen
            seen += chunk
    writer.transport.abort()  # gone before the final chunk
    await asyncio.sleep(1.0)
    async with http.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    requests = "disagg_proxy_requests_total"
    assert value(text, requests, route="/v1/completions", outcome="ok") == 1, text
    assert value(text, requests, outcome="client_gone") is None
    assert p.aborts == [] and d.aborts == []
