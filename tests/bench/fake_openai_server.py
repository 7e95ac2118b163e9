"""A fake OpenAI-compatible streaming server for the benchmark tests (run as a subprocess).

It streams ``max_tokens`` chunks with a configurable first-token and per-token delay, can fail
every Nth request, and records every request body (``GET /fake/requests``) so tests can check
what the client sent. It listens on 127.0.0.1 and prints ``PORT <n>`` once it is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

STATE = web.AppKey("state", dict)


def _chunk(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _token_chunk(chat: bool, index: int) -> dict:
    text = f"t{index} "
    if chat:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        return {"id": "c", "object": "chat.completion.chunk", "choices": [choice]}
    choice = {"index": 0, "text": text, "finish_reason": None}
    return {"id": "c", "object": "text_completion", "choices": [choice]}


async def _stream(request: web.Request, body: dict, chat: bool) -> web.StreamResponse:
    cfg = request.app[STATE]["cfg"]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    num_tokens = int(body.get("max_tokens", 16))
    await resp.write(b": ping\n\n")  # an SSE comment the client must skip
    if chat:  # vLLM sends a role-only first chunk: it is not a token
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
        await resp.write(_chunk({"object": "chat.completion.chunk", "choices": [role]}))
    await asyncio.sleep(cfg.ttft_delay_s)
    for i in range(num_tokens):
        if i:
            await asyncio.sleep(cfg.token_delay_s)
        await resp.write(_chunk(_token_chunk(chat, i)))
    if cfg.usage and body.get("stream_options", {}).get("include_usage"):
        usage = {"prompt_tokens": 1, "completion_tokens": num_tokens,
                 "total_tokens": num_tokens + 1}
        obj = "chat.completion.chunk" if chat else "text_completion"
        await resp.write(_chunk({"object": obj, "choices": [], "usage": usage}))
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def _handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await request.json()
    state["count"] += 1
    if state["cfg"].record:
        state["bodies"].append(body)
    fail_every = state["cfg"].fail_every
    if fail_every and state["count"] % fail_every == 0:
        return web.json_response({"error": {"message": "injected failure", "code": 500}},
                                 status=500)
    return await _stream(request, body, chat=request.path.endswith("/chat/completions"))


async def _requests(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE]["bodies"])


def make_app(cfg: argparse.Namespace) -> web.Application:
    """The fake server's app."""
    app = web.Application()
    app[STATE] = {"cfg": cfg, "count": 0, "bodies": []}
    app.router.add_post("/v1/completions", _handle)
    app.router.add_post("/v1/chat/completions", _handle)
    app.router.add_get("/fake/requests", _requests)
    return app


async def _serve(cfg: argparse.Namespace) -> None:
    runner = web.AppRunner(make_app(cfg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = runner.addresses[0][1]
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    """Run until killed."""
    p = argparse.ArgumentParser()
    p.add_argument("--ttft-delay-s", type=float, default=0.0)
    p.add_argument("--token-delay-s", type=float, default=0.0)
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--no-usage", dest="usage", action="store_false")
    p.add_argument("--no-record", dest="record", action="store_false")
    asyncio.run(_serve(p.parse_args()))


if __name__ == "__main__":
    main()
