"""One streaming request against the fake server: timings, token counts, request body, errors."""

from __future__ import annotations

import socket

import aiohttp
import pytest

from bench.client import RequestInput, build_payload, phase_seconds, send_request


def _req(base_url: str, endpoint: str = "/v1/completions", output_len: int = 5,
         **kwargs) -> RequestInput:
    return RequestInput(api_url=base_url + endpoint, model="m", prompt="hello", prompt_len=6,
                        output_len=output_len, **kwargs)


async def _send(req: RequestInput, timeout_s: float = 10.0):
    async with aiohttp.ClientSession() as session:
        return await send_request(session, req, timeout_s)


async def test_stream_timings_and_usage_tokens(fake_server_factory):
    server = fake_server_factory("--ttft-delay-s", "0.05", "--token-delay-s", "0.02")
    out = await _send(_req(server.base_url, output_len=5))
    assert out.success and out.error == ""
    assert out.output_tokens == 5 and out.prompt_len == 6
    assert out.ttft_s >= 0.05
    assert len(out.itl_s) == 4 and all(gap >= 0.015 for gap in out.itl_s)
    assert out.latency_s == pytest.approx(out.ttft_s + sum(out.itl_s))
    assert out.end_s >= out.start_s + out.latency_s


async def test_request_body_asks_for_an_exact_streamed_length(fake_server):
    await _send(_req(fake_server.base_url, output_len=7, extra_body={"top_k": 1}))
    body = fake_server.requests()[-1]
    assert body["max_tokens"] == 7 and body["min_tokens"] == 7 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["prompt"] == "hello" and body["top_k"] == 1


async def test_chat_endpoint_skips_the_role_chunk(fake_server_factory):
    server = fake_server_factory("--ttft-delay-s", "0.05")
    out = await _send(_req(server.base_url, "/v1/chat/completions", output_len=3))
    assert out.success and out.output_tokens == 3 and len(out.itl_s) == 2
    assert out.ttft_s >= 0.05  # the empty role chunk arrives at once but is not a token
    assert server.requests()[-1]["messages"] == [{"role": "user", "content": "hello"}]


async def test_without_usage_tokens_are_counted_from_chunks(fake_server_factory):
    server = fake_server_factory("--no-usage")
    out = await _send(_req(server.base_url, output_len=6))
    assert out.success and out.output_tokens == 6


async def test_http_error_is_recorded(fake_server_factory):
    server = fake_server_factory("--fail-every", "1")
    out = await _send(_req(server.base_url))
    assert not out.success
    assert out.error.startswith("HTTP 500:") and "injected failure" in out.error


async def test_connection_refused_is_recorded():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = await _send(_req(f"http://127.0.0.1:{port}"))
    assert not out.success and "ClientConnectorError" in out.error


async def test_request_deadline(fake_server_factory):
    server = fake_server_factory("--ttft-delay-s", "5")
    out = await _send(_req(server.base_url), timeout_s=0.3)
    assert not out.success and out.error == "timed out after 0.3 s"


def test_chat_payload_uses_messages_not_prompt():
    body = build_payload(_req("http://x", "/v1/chat/completions"))
    assert "prompt" not in body and body["messages"][0]["content"] == "hello"


def test_phase_seconds_splits_out_each_instances_own_timings():
    timings = {"mode": "read", "ttft_s": 0.1, "prefill_queue_s": 0.003, "kv_transfer_s": None,
               "prefill": {"queue_s": 0.002, "compute_s": 0.09, "kv_transfer_s": None},
               "decode": None, "flag_s": True}
    assert phase_seconds(timings) == {"ttft": 0.1, "prefill_queue": 0.003,
                                      "prefill_own_queue": 0.002, "prefill_own_compute": 0.09}
