"""``POST /tokenize`` and ``POST /detokenize``, with vLLM's request and response shapes.

    /tokenize   {"prompt": S} or {"messages": [...]} (+ "add_special_tokens", "return_token_strs")
                -> {"count", "max_model_len", "tokens", "token_strs"}
    /detokenize {"tokens": [ids]} -> {"prompt"}

The ids are exactly what a completion (prompt) or chat completion (messages) would prefill.
Outside ``/v1``, so ``--api-key`` leaves them open, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from disagg.common.openai_api import DetokenizeRequest, TokenizeRequest, decode_body
from disagg.common.prompt_ids import check_token_ids, tokenize_ids
from disagg.common.tokenizer import Tokenizer


class TokenizeApi:
    """The two routes over the instance's tokenizer; ``check_model`` raises for a ``model``
    this server does not serve, ``max_model_len`` gives the synced context length."""

    def __init__(self, tokenizer: Tokenizer, check_model: Callable[[str | None], None],
                 max_model_len: Callable[[], int]) -> None:
        self.tok = tokenizer
        self.check_model = check_model
        self.max_model_len = max_model_len

    async def tokenize(self, request: web.Request) -> web.Response:
        """POST /tokenize."""
        req = decode_body(await request.read(), TokenizeRequest)
        self.check_model(req.model)
        ids = tokenize_ids(req, self.tok)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": self.max_model_len(),
                                "tokens": ids, "token_strs": None}
        if req.return_token_strs:
            body["token_strs"] = [self.tok.decode([t], skip_special_tokens=False) for t in ids]
        return web.json_response(body)

    async def detokenize(self, request: web.Request) -> web.Response:
        """POST /detokenize."""
        req = decode_body(await request.read(), DetokenizeRequest)
        self.check_model(req.model)
        check_token_ids(req.tokens, self.tok, "tokens")
        return web.json_response({"prompt": self.tok.decode(req.tokens,
                                                            skip_special_tokens=False)})

    def routes(self, app: web.Application) -> None:
        """Attach both routes."""
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
