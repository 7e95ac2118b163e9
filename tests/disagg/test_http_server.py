"""Requests aiohttp's HTTP parser refuses get the OpenAI-style 400 every other refusal gets
(disagg/common/http_server.py), and the server goes on serving."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from support import MALFORMED_HTTP, assert_malformed_answer, raw_http

from disagg.common.http_server import protocol_error_body, setup_runner


@pytest.fixture
async def served() -> AsyncIterator[str]:
    async def ok(request: web.Request) -> web.Response:
        try:
            return web.json_response({"body": (await request.read()).decode()})
        except Exception as exc:  # as the instance's and the proxy's middlewares answer
            return web.json_response({"error": str(exc)}, status=400)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = await setup_runner(app, access_log=None)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


@pytest.mark.parametrize("case", sorted(MALFORMED_HTTP))
async def test_a_request_the_parser_refuses_gets_a_json_400(served: str, case: str) -> None:
    answer = await asyncio.to_thread(raw_http, served, MALFORMED_HTTP[case])
    assert_malformed_answer(*answer)
    good = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    status, _, body = await asyncio.to_thread(raw_http, served, good)
    assert (status, body) == (200, b'{"body": "hi"}')


def test_the_body_quotes_only_the_first_line_of_the_reason_and_hides_5xx_detail() -> None:
    long = "Got more than 8190 bytes when reading: b'" + "a" * 9000 + "'\n  ^"
    assert len(protocol_error_body(400, long)) < 400
    assert b"8190" in protocol_error_body(400, long)
    assert b"secret" not in protocol_error_body(500, "secret traceback")
    assert b"Bad Request" in protocol_error_body(400, None)


async def test_a_body_that_does_not_decompress_is_not_logged_as_a_server_fault(
        served: str, caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp drains the rest of the body after the answer and meets the bad bytes again:
    that used to log an "Unhandled exception" traceback per request."""
    data = (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 7"
            b"\r\nConnection: close\r\n\r\nnotgzip")
    with caplog.at_level(logging.DEBUG):
        status, _, _ = await asyncio.to_thread(raw_http, served, data)
        await asyncio.sleep(0.1)
    assert status == 400
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
