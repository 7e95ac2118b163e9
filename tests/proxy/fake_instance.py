"""A fake ``disagg serve`` instance for proxy tests: the HTTP contract, no model.

Used two ways: imported (by path, from conftest.py) as ``FakeInstance`` inside the test's event
loop, and run as a script by the launcher tests in place of ``python -m disagg.cli``:

    python fake_instance.py serve MODEL --host H --port P --kv-transfer-config JSON
        [--fake-exit-after-s S] [--fake-exit-role ROLE] [anything else is ignored]

Generated text is a pure function of (prompt, max_tokens), so a P/D answer can be compared with
a "monolithic" one. Behaviour knobs (``FakeInstance.behavior``) make it fail on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

OUTPUT_PREFIX = "tok"
KV_KEY_HEADER = "X-Disagg-KV-Key"


FIRST_TOKEN_ID = 7
"""The token id a READ prefill says it sampled (its text is the first generated token's)."""


@dataclass
class Behavior:
    """What the fake does wrong (or slowly) on generation routes."""

    fail_status: int | None = None
    """Answer every generation request with this HTTP status and an OpenAI error body."""
    fail_code: str | None = None
    """With ``fail_status``: the error body's ``code`` (default: the status)."""
    fail_text: str | None = None
    """With ``fail_status``: this plain-text body instead (a server that is not disagg's)."""
    drop_connection: bool = False
    """Close the TCP connection without answering."""
    hang_s: float = 0.0
    """Wait this long before answering."""
    frozen: bool = False
    """Answer nothing on any route, its health probes included (a stopped process)."""
    token_delay_s: float = 0.0
    """Pause between streamed tokens."""
    end_without_done: bool = False
    """In a stream, end the response cleanly without ``data: [DONE]`` (a truncated answer)."""
    drop_after_events: int | None = None
    """In a stream, close the connection after this many events."""
    omit_kv_params: bool = False
    """As a READ prefill, leave ``kv_transfer_params`` out of the response."""
    fail_for_engine: str | None = None
    """As a decode, answer 500 when the KV is to come from this engine id."""
    linger_after_done_s: float = 0.0
    """In a stream, wait this long between ``data: [DONE]`` and the end of the response."""
    queue_s: float = 0.0
    """Wait this long as queueing (reported in ``disagg_timings``)."""
    compute_s: float = 0.0
    """Then this long as the prefill's compute."""
    kv_transfer_s: float = 0.0
    """On the side that moves the KV (READ decode, WRITE prefill): this long as the transfer,
    before the compute (decode) or after it (prefill)."""
    after_kv_s: float = 0.0
    """A decode: this long between its KV in place and its first step."""


@dataclass
class FakeTimings:
    """What a real instance reports as ``disagg_timings`` (disagg/common/timings.py)."""

    received_s: float
    queue_s: float = 0.0
    compute_s: float = 0.0
    kv_transfer_s: float | None = None
    kv_to_scheduled_s: float | None = None

    def report(self) -> dict[str, Any]:
        """The object, with total_s ending now (the first token or the answer goes out)."""
        total_s = time.monotonic() - self.received_s
        return {"queue_s": self.queue_s, "compute_s": self.compute_s,
                "output_s": total_s - self.queue_s - self.compute_s, "total_s": total_s,
                "kv_transfer_s": self.kv_transfer_s, "kv_to_scheduled_s": self.kv_to_scheduled_s}


def generated_tokens(prompt: str, max_tokens: int) -> list[str]:
    """The fake model's output: deterministic in prompt and length."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:6]
    return [f" {OUTPUT_PREFIX}{i}-{digest}" for i in range(max_tokens)]


def _prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return "|".join(f"{m.get('role')}:{m.get('content')}" for m in body["messages"])
    return str(body.get("prompt"))


@dataclass
class FakeInstance:
    """One fake instance; ``requests`` and ``aborts`` record what the proxy sent."""

    role: str = "kv_producer"
    mode: str | None = "read"
    model: str = "builtin:tiny-llama"
    model_aliases: tuple[str, ...] = ()
    model_root: str | None = None
    max_model_len: int = 2048
    engine_id: str = field(default_factory=lambda: "engine-" + uuid.uuid4().hex[:8])
    kv_handshake_port: int = 17000
    behavior: Behavior = field(default_factory=Behavior)
    requests: list[dict[str, Any]] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    disconnects: int = 0
    """Streams cut short because the proxy closed the connection."""
    probes: int = 0
    """``/instance_info`` requests received (health probes)."""
    kv_params_key: str | None = None
    """Like ``disagg serve --kv-params-key``: kv_transfer_params and aborts need it (else 401)."""
    kv_keys: list[str | None] = field(default_factory=list)
    """The X-Disagg-KV-Key header of every generation and abort request."""
    url: str = ""
    _runner: web.AppRunner | None = None

    def info(self) -> dict[str, Any]:
        """The ``/instance_info`` body."""
        return {"role": self.role, "mode": self.mode, "engine_id": self.engine_id,
                "http_url": self.url, "max_model_len": self.max_model_len, "block_size": 16,
                "dp_size": 1, "model": self.model, "model_aliases": list(self.model_aliases),
                "model_root": self.model_root,
                "kv_host": "127.0.0.1",
                "kv_handshake_port": self.kv_handshake_port,
                "kv_notify_port": self.kv_handshake_port + 1}

    def make_app(self) -> web.Application:
        """The fake's aiohttp app."""
        app = web.Application()
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/kv_transfer/abort", self._abort)
        app.router.add_get("/instance_info", self._info)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        return app

    async def _tokenize(self, request: web.Request) -> web.Response:
        """The prompt's bytes as tokens (400 without one), naming this instance."""
        body = await request.json()
        if not isinstance(body.get("prompt"), str):
            return web.json_response({"error": {"message": "no prompt", "type": "bad",
                                                "param": "prompt", "code": 400}}, status=400)
        tokens = list(body["prompt"].encode())
        return web.json_response({"tokens": tokens, "count": len(tokens),
                                  "engine_id": self.engine_id})

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0: any free port); returns the URL."""
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.url = f"http://{bound_host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        """Stop serving (also how a test "kills" an instance)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def kv_requests(self) -> list[dict[str, Any]]:
        """The ``kv_transfer_params`` of every generation request received."""
        return [r.get("kv_transfer_params") or {} for r in self.requests]

    async def _info(self, request: web.Request) -> web.Response:
        self.probes += 1
        await self._stay_frozen()
        return web.json_response(self.info())

    async def _health(self, request: web.Request) -> web.Response:
        await self._stay_frozen()
        return web.Response(text="ok")

    async def _stay_frozen(self) -> None:
        while self.behavior.frozen:
            await asyncio.sleep(0.05)

    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "max_model_len": self.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    def _key_refused(self, request: web.Request, needs_key: bool) -> web.Response | None:
        """Record the request's KV key; a 401 when it is needed and wrong."""
        sent = request.headers.get(KV_KEY_HEADER)
        self.kv_keys.append(sent)
        if self.kv_params_key is None or not needs_key or sent == self.kv_params_key:
            return None
        err = {"message": "wrong KV params key", "type": "authentication_error",
               "param": None, "code": 401}
        return web.json_response({"error": err}, status=401)

    async def _abort(self, request: web.Request) -> web.Response:
        refused = self._key_refused(request, needs_key=True)
        if refused is not None:
            return refused
        self.aborts.append((await request.json())["transfer_id"])
        return web.json_response({"aborted": True})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        received_s = time.monotonic()
        body = await request.json()
        refused = self._key_refused(request, "kv_transfer_params" in body)
        if refused is not None:
            return refused
        self.requests.append(body)
        b = self.behavior
        await self._stay_frozen()
        if b.hang_s:
            await asyncio.sleep(b.hang_s)
        if b.drop_connection:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        remote_engine = (body.get("kv_transfer_params") or {}).get("remote_engine_id")
        if b.fail_for_engine is not None and remote_engine == b.fail_for_engine:
            err: dict[str, str | int | None] = {
                "message": "KV transfer failed", "type": "server_error", "param": None,
                "code": "kv_transfer_failed"}
            return web.json_response({"error": err}, status=500)
        if b.fail_status is not None and b.fail_text is not None:
            return web.Response(status=b.fail_status, text=b.fail_text)
        if b.fail_status is not None:
            err = {"message": "fake failure", "type": "server_error", "param": None,
                   "code": b.fail_code or b.fail_status}
            return web.json_response({"error": err}, status=b.fail_status)
        tokens = generated_tokens(_prompt_text(body), int(body.get("max_tokens") or 16))
        chat = "messages" in body
        timings = await self._phases(body, received_s)
        if body.get("stream"):
            return await self._stream(request, body, tokens, chat, timings)
        out = self._full_response(body, tokens, chat)
        if body.get("disagg_timings"):
            out["disagg_timings"] = timings.report()
        return web.json_response(out)

    async def _phases(self, body: dict[str, Any], received_s: float) -> FakeTimings:
        """Sleep through the behaviour's queue, transfer and compute, timing each."""
        b, t = self.behavior, FakeTimings(received_s)
        params = body.get("kv_transfer_params") or {}
        moves_kv = b.kv_transfer_s > 0 and (
            (params.get("do_remote_prefill") and params.get("mode") == "read")
            or (params.get("do_remote_decode") and params.get("mode") == "write"))
        await asyncio.sleep(b.queue_s)
        if moves_kv and params.get("do_remote_prefill"):
            start_s = time.monotonic()
            await asyncio.sleep(b.kv_transfer_s)
            t.kv_transfer_s = time.monotonic() - start_s
        if params.get("do_remote_prefill"):
            start_s = time.monotonic()
            await asyncio.sleep(b.after_kv_s)
            t.kv_to_scheduled_s = time.monotonic() - start_s
        t.queue_s = time.monotonic() - received_s
        start_s = time.monotonic()
        await asyncio.sleep(b.compute_s)
        t.compute_s = time.monotonic() - start_s
        if moves_kv and params.get("do_remote_decode"):
            start_s = time.monotonic()
            await asyncio.sleep(b.kv_transfer_s)
            t.kv_transfer_s = time.monotonic() - start_s
        return t

    def _full_response(self, body: dict[str, Any], tokens: list[str],
                       chat: bool) -> dict[str, Any]:
        text = "".join(tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out: dict[str, Any] = {
            "id": "cmpl-" + uuid.uuid4().hex, "created": 0, "model": self.model,
            "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": len(tokens),
                      "total_tokens": 3 + len(tokens)}}
        params = body.get("kv_transfer_params") or {}
        if params.get("do_remote_prefill"):
            out["kv_transfer_params"] = params  # the real instance echoes them too
        if params.get("do_remote_decode") and params.get("mode") == "read" \
                and not self.behavior.omit_kv_params:
            info = self.info()
            out["kv_transfer_params"] = {
                "transfer_id": params["transfer_id"], "remote_engine_id": self.engine_id,
                "remote_host": info["kv_host"], "remote_handshake_port": info["kv_handshake_port"],
                "remote_notify_port": info["kv_notify_port"], "remote_block_ids": [1, 2, 3],
                "remote_num_tokens": 40, "first_token_id": FIRST_TOKEN_ID}
        return out

    async def _stream(self, request: web.Request, body: dict[str, Any], tokens: list[str],
                      chat: bool, timings: FakeTimings) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = [self._chunk(t, chat, i == len(tokens) - 1) for i, t in enumerate(tokens)]
        sent = (body.get("kv_transfer_params") or {}).get("first_token_text")
        if sent is not None:  # as a real decode: the proxy streamed this token already
            if not tokens or tokens[0] != sent:
                err = {"message": "the decode's first token text differs from the prefill's",
                       "type": "server_error", "param": None, "code": 500}
                events = [{"error": err}]
            else:
                choice = events[0]["choices"][0]
                choice["text" if not chat else "delta"] = "" if not chat else {
                    "role": "assistant", "content": ""}
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({"id": "x", "object": "chunk", "created": 0, "model": self.model,
                           "choices": [], "usage": {"prompt_tokens": 3,
                                                    "completion_tokens": len(tokens),
                                                    "total_tokens": 3 + len(tokens)}})
        report = timings.report() if body.get("disagg_timings") else None
        if report is not None:  # as a real instance: the last chunk carries them
            events[-1]["disagg_timings"] = report
        try:
            for num_sent, event in enumerate(events):
                if self.behavior.drop_after_events == num_sent:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                if self.behavior.token_delay_s:
                    await asyncio.sleep(self.behavior.token_delay_s)
                await self._stay_frozen()  # mid-stream too
            if not self.behavior.end_without_done:
                await resp.write(b"data: [DONE]\n\n")
            await asyncio.sleep(self.behavior.linger_after_done_s)
            await resp.write_eof()
        except ConnectionResetError:
            self.disconnects += 1
        return resp

    def _chunk(self, token: str, chat: bool, last: bool) -> dict[str, Any]:
        finish = "length" if last else None
        if chat:
            choice = {"index": 0, "delta": {"role": "assistant", "content": token},
                      "finish_reason": finish, "logprobs": None}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": token, "finish_reason": finish, "logprobs": None}
            kind = "text_completion"
        return {"id": "cmpl-x", "object": kind, "created": 0, "model": self.model,
                "choices": [choice]}


async def _serve_main(args: argparse.Namespace) -> int:
    kv = json.loads(args.kv_transfer_config) if args.kv_transfer_config else {}
    extra = kv.get("kv_connector_extra_config", {})
    fake = FakeInstance(role=kv.get("kv_role", "kv_both"), mode=extra.get("mode"),
                        model=args.model, kv_handshake_port=int(extra.get("base_port", 17000)),
                        kv_params_key=os.environ.get("DISAGG_KV_PARAMS_KEY"))
    await fake.start(args.host, args.port)
    print(f"disagg: ready on {fake.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    exits = args.fake_exit_after_s is not None and args.fake_exit_role in (None, fake.role)
    try:
        await asyncio.wait_for(stop.wait(), args.fake_exit_after_s if exits else None)
    except asyncio.TimeoutError:
        print("fake instance: exiting on purpose", file=sys.stderr, flush=True)
        return 3
    finally:
        await fake.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``serve MODEL --host --port --kv-transfer-config`` like ``disagg.cli``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kv-transfer-config", default=None)
    parser.add_argument("--fake-exit-after-s", type=float, default=None)
    parser.add_argument("--fake-exit-role", default=None)
    args, _ = parser.parse_known_args(argv)
    return asyncio.run(_serve_main(args))


if __name__ == "__main__":
    sys.exit(main())
