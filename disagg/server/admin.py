"""The instance's admin endpoints: pause, resume, is_paused, collective_rpc (Bearer key).

    POST /pause?mode=abort|wait|keep[&timeout=S]   200 when every rank is paused
    POST /resume[?timeout=S]                        200 when every rank runs again
    GET  /is_paused                                 {"paused", "state", "mode"}
    POST /collective_rpc {"method", "args"?, "timeout"?}   {"method", "results": [per rank]}

Every endpoint needs ``Authorization: Bearer <--admin-key>`` (missing or wrong: 401; server
started without --admin-key: 403). A pause while paused or pausing, or a resume while running:
409. A pause that is not complete by its deadline: 504, and the instance stays "pausing"
(GET /is_paused follows it; POST /resume cancels it). Requests that arrive while paused are
held by the engine cores and run after resume, whatever the mode; in-flight requests ended by
mode=abort get an error that says so (disagg.common.pause.PAUSE_ABORT_ERROR).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from disagg.common.openai_api import ApiError, decode_body
from disagg.common.pause import PauseConflict, PauseMode
from disagg.dp.rpc import COLLECTIVE_METHODS, RPC_METHODS, RpcArgError, validate_rpc
from disagg.server.engine_client import EngineClient
from disagg.server.engine_health import EngineDeadError, EngineUnavailableError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DEFAULT_PAUSE_TIMEOUT_S = 60.0
DEFAULT_RPC_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 3600.0


def _check_key(key: str | None, request: web.Request) -> None:
    if key is None:
        raise ApiError(403, "admin endpoints are disabled; start the server with --admin-key",
                       err_type="permission_error", code="admin_disabled")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # Headers arrive decoded with surrogateescape: encoding back gives the bytes as sent.
    sent = token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent, key.encode()):
        raise ApiError(401, "missing or wrong admin key; send 'Authorization: Bearer KEY'",
                       err_type="authentication_error", code="invalid_admin_key")


def _timeout(request: web.Request, default: float) -> float:
    raw = request.query.get("timeout")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT_S:
        raise ApiError(400, f"timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], "
                       f"got {raw!r}", param="timeout")
    return value


def _conflict(exc: PauseConflict) -> ApiError:
    return ApiError(409, str(exc), code="pause_conflict")


class AdminApi:
    """Handlers bound to one engine client and admin key."""

    def __init__(self, engine: EngineClient, admin_key: str | None) -> None:
        self.engine, self.key = engine, admin_key

    def routes(self, app: web.Application) -> None:
        """Register the admin routes, each behind the key check."""
        app.router.add_post("/pause", self._guard(self.pause))
        app.router.add_post("/resume", self._guard(self.resume))
        app.router.add_get("/is_paused", self._guard(self.is_paused))
        app.router.add_post("/collective_rpc", self._guard(self.collective_rpc))

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            """The handler, after the admin key check."""
            _check_key(self.key, request)
            try:
                return await handler(request)
            except EngineDeadError as exc:
                raise ApiError(503, f"engine unavailable: {exc}", err_type="server_error",
                               code="engine_dead") from None
        return guarded

    async def pause(self, request: web.Request) -> web.Response:
        """POST /pause?mode=abort|wait|keep: pause every rank (two-phase in lockstep mode)."""
        raw = request.query.get("mode", PauseMode.ABORT.value)
        try:
            mode = PauseMode(raw)
        except ValueError:
            raise ApiError(400, f"mode must be abort, wait or keep, got {raw!r}",
                           param="mode") from None
        timeout_s = _timeout(request, DEFAULT_PAUSE_TIMEOUT_S)
        try:
            done = await self.engine.pause(mode, timeout_s)
        except PauseConflict as exc:
            raise _conflict(exc) from None
        if not done:
            raise ApiError(504, f"pause (mode={mode.value}) not complete after {timeout_s:g} s; "
                           f"ranks {self.engine.pause_state.missing()} are still "
                           "finishing in-flight work; the instance stays pausing (GET "
                           "/is_paused follows it, POST /resume cancels it)",
                           err_type="timeout_error", code="pause_timeout")
        return web.json_response(self.engine.pause_state.as_json())

    async def resume(self, request: web.Request) -> web.Response:
        """POST /resume: every rank runs again; held requests start."""
        timeout_s = _timeout(request, DEFAULT_PAUSE_TIMEOUT_S)
        try:
            done = await self.engine.resume(timeout_s)
        except PauseConflict as exc:
            raise _conflict(exc) from None
        if not done:
            raise ApiError(504, f"resume sent, but ranks {self.engine.pause_state.missing()} "
                           f"did not confirm within {timeout_s:g} s",
                           err_type="timeout_error", code="resume_timeout")
        return web.json_response(self.engine.pause_state.as_json())

    async def is_paused(self, request: web.Request) -> web.Response:
        """GET /is_paused."""
        return web.json_response(self.engine.pause_state.as_json())

    async def collective_rpc(self, request: web.Request) -> web.Response:
        """POST /collective_rpc {"method", "args", "timeout"}: run it on every rank."""
        method, args, timeout_s = _rpc_body(await request.read())
        try:
            results = await self.engine.collective_rpc(method, args, timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"collective_rpc {method!r} did not finish on every rank within "
                           f"{timeout_s:g} s (in lockstep mode a collective waits for the ranks "
                           "to stop stepping: pause first)", err_type="timeout_error",
                           code="rpc_timeout") from None
        except EngineUnavailableError as exc:
            raise ApiError(503, f"engine unavailable: {exc}", err_type="server_error") from None
        except RuntimeError as exc:
            raise ApiError(500, f"collective_rpc {method!r} failed: {exc}",
                           err_type="server_error") from None
        return web.json_response({"method": method, "results": results})


def _rpc_body(body: bytes) -> tuple[str, dict[str, Any], float]:
    """Parse and validate the collective_rpc body; ApiError(400) on anything wrong."""
    data = decode_body(body) if body.strip() else {}
    if not isinstance(data, dict) or not isinstance(data.get("method"), str):
        raise ApiError(400, "body must be a JSON object with a 'method' string",
                       param="method")
    args = data.get("args") or {}
    if not isinstance(args, dict):
        raise ApiError(400, "'args' must be a JSON object", param="args")
    timeout_s = data.get("timeout", DEFAULT_RPC_TIMEOUT_S)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) \
            or not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ApiError(400, f"'timeout' must be seconds in (0, {MAX_TIMEOUT_S:g}]",
                       param="timeout")
    try:
        validate_rpc(data["method"], args, RPC_METHODS)
    except RpcArgError as exc:
        raise ApiError(400, str(exc), param="method") from None
    if data["method"] in COLLECTIVE_METHODS:
        # the ranks' own wait ends within the caller's: a rank still in a barrier after the
        # answer went out would serve nothing until its own, longer, timeout
        args = {**args, "timeout_s": min(float(args.get("timeout_s", timeout_s)), timeout_s)}
    return data["method"], args, float(timeout_s)
