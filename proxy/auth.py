"""The proxy's ``--api-key``: clients' ``/v1/*`` requests must carry it as a Bearer token;
/health, /metrics and the admin API (its own key) stay outside it."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from disagg.common.auth import API_KEY_MESSAGE, bearer_matches, needs_api_key
from proxy.errors import error_response
from proxy.state import STATE_KEY


@web.middleware
async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 with an OpenAI-style body for a /v1/* request without the key (when one is set)."""
    key = request.app[STATE_KEY].cfg.api_key
    if key is not None and needs_api_key(request.path) and not bearer_matches(
            request.headers.get("Authorization", ""), key):
        return error_response(401, API_KEY_MESSAGE)
    return await handler(request)
