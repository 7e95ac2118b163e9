"""A fake OpenAI-compatible streaming server for the benchmark tests (run as a subprocess).

It streams ``max_tokens`` chunks with a configurable first-token and per-token delay, can fail
every Nth request, and records every request body (``GET /fake/requests``) and its headers
(``GET /fake/headers``) so tests can check what the client sent. ``GET /metrics`` serves an
instance's prefix-cache and KV-transfer counters from a toy prefix cache over prompt
characters: a prompt's hits are its longest common prefix with any earlier prompt, and the rest
"moves" at ``BYTES_PER_CHAR``. It listens on 127.0.0.1 and prints ``PORT <n>`` once it is
ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

STATE = web.AppKey("state", dict)
BYTES_PER_CHAR = 8
PHASE_TIMINGS = {"mode": "read", "ttft_s": 0.01, "proxy_queue_s": 0.001, "prefill_queue_s": 0.002,
                 "prefill_compute_s": 0.004, "kv_transfer_s": 0.001, "decode_admission_s": 0.001,
                 "first_token_s": 0.001, "prefill": {"queue_s": 0.001}, "decode": None}
"""What ``--phase-timings`` answers as ``disagg_timings`` (the proxy's shape)."""


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
    timings = {"disagg_timings": PHASE_TIMINGS} \
        if cfg.phase_timings and body.get("disagg_timings") else {}
    with_usage = cfg.usage and body.get("stream_options", {}).get("include_usage")
    for i in range(num_tokens):
        if i:
            await asyncio.sleep(cfg.token_delay_s)
        last = timings if i == num_tokens - 1 and not with_usage else {}
        await resp.write(_chunk({**_token_chunk(chat, i), **last}))
    if with_usage:
        usage = {"prompt_tokens": 1, "completion_tokens": num_tokens,
                 "total_tokens": num_tokens + 1}
        obj = "chat.completion.chunk" if chat else "text_completion"
        await resp.write(_chunk({"object": obj, "choices": [], "usage": usage, **timings}))
    await resp.write(b"data: [DONE]\n\n")
    return resp


def _prompt_text(body: dict) -> str:
    if "messages" in body:
        return "".join(m["content"] for m in body["messages"])
    return str(body.get("prompt", ""))


def _count_cache(state: dict, prompt: str) -> None:
    """The toy prefix cache: a character trie, so a prompt's hits are its longest common
    prefix with any earlier prompt (one walk, however many prompts came before)."""
    node, hits = state["trie"], 0
    for char in prompt:
        if char not in node:
            break
        node, hits = node[char], hits + 1
    for char in prompt[hits:]:
        node = node.setdefault(char, {})
    state["queries"] += len(prompt)
    state["hits"] += hits
    state["bytes_moved"] += (len(prompt) - hits) * BYTES_PER_CHAR


async def _handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await request.json()
    state["count"] += 1
    _count_cache(state, _prompt_text(body))
    if state["cfg"].record:
        state["bodies"].append(body)
        state["headers"].append(dict(request.headers))
    fail_every = state["cfg"].fail_every
    if fail_every and state["count"] % fail_every == 0:
        return web.json_response({"error": {"message": "injected failure", "code": 500}},
                                 status=500)
    return await _stream(request, body, chat=request.path.endswith("/chat/completions"))


async def _requests(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE]["bodies"])


async def _headers(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE]["headers"])


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    lab = '{model_name="fake"}'
    lines = ["# HELP disagg_prefix_cache_queries Prompt tokens looked up",
             "# TYPE disagg_prefix_cache_queries counter",
             f"disagg_prefix_cache_queries{lab} {state['queries']}",
             "# TYPE disagg_prefix_cache_hits counter",
             f"disagg_prefix_cache_hits{lab} {state['hits']}",
             "# TYPE disagg_kv_connector_bytes_moved_total gauge",
             f"disagg_kv_connector_bytes_moved_total{lab} {float(state['bytes_moved'])}"]
    return web.Response(text="\n".join(lines) + "\n")


def make_app(cfg: argparse.Namespace) -> web.Application:
    """The fake server's app."""
    app = web.Application()
    app[STATE] = {"cfg": cfg, "count": 0, "bodies": [], "headers": [], "trie": {},
                  "queries": 0, "hits": 0, "bytes_moved": 0}
    app.router.add_post("/v1/completions", _handle)
    app.router.add_post("/v1/chat/completions", _handle)
    app.router.add_get("/fake/requests", _requests)
    app.router.add_get("/fake/headers", _headers)
    app.router.add_get("/metrics", _metrics)
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
    p.add_argument("--phase-timings", action="store_true",
                   help="answer disagg_timings (when asked) in the last chunk")
    asyncio.run(_serve(p.parse_args()))


if __name__ == "__main__":
    main()
