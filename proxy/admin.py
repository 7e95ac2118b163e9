"""The admin API (list, add, remove, drain, resume instances), behind a Bearer key.

    GET    /admin/instances                                   -> {"instances": [...]}
    POST   /admin/instances         {"url": U, "pool": "prefill"|"decode"}
    DELETE /admin/instances         {"url": U}
    POST   /admin/instances/drain   {"url": U}   no new requests; in-flight ones finish
    POST   /admin/instances/resume  {"url": U}   back into rotation after the next probe
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from disagg.common.openai_api import ApiError, decode_body
from proxy.errors import ProxyError, error_response, from_proxy_error
from proxy.health import probe_instance
from proxy.registry import InstanceState, Origin, Pool, normalize_url
from proxy.state import STATE_KEY

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _auth_error(request: web.Request) -> web.Response | None:
    """None when the request carries the admin key, else the error to send."""
    key = request.app[STATE_KEY].cfg.admin_key
    if key is None:
        return error_response(403, "the admin API is disabled; start the proxy with --admin-key")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # Headers arrive decoded with surrogateescape: encoding back gives the bytes as sent.
    sent = token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent, key.encode()):
        return error_response(401, "missing or wrong admin key; send 'Authorization: Bearer KEY'")
    return None


def admin_only(handler: Handler) -> Handler:
    """Wrap a handler: check the key, turn ProxyError into an OpenAI-style response."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        """The handler, behind the key check."""
        denied = _auth_error(request)
        if denied is not None:
            return denied
        try:
            return await handler(request)
        except ProxyError as exc:
            return from_proxy_error(exc)
    return wrapped


async def _json_object(request: web.Request) -> tuple[dict[str, Any], str]:
    """The body as a dict, and its ``url`` normalized; 400 on anything else."""
    try:
        body = decode_body(await request.read())
    except ApiError as exc:
        raise ProxyError(exc.status, exc.message, param=exc.param) from None
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        raise ProxyError(400, "body must be a JSON object with a 'url' string", param="url")
    try:
        return body, normalize_url(body["url"])
    except ValueError as exc:
        raise ProxyError(400, str(exc), param="url") from None


@admin_only
async def list_instances(request: web.Request) -> web.Response:
    """Every registered instance with its state and load."""
    registry = request.app[STATE_KEY].registry
    return web.json_response({"instances": [i.to_json() for i in registry.instances()]})


@admin_only
async def add_instance(request: web.Request) -> web.Response:
    """Add an instance to a pool and probe it at once."""
    st = request.app[STATE_KEY]
    body, url = await _json_object(request)
    try:
        pool = Pool(body.get("pool"))
    except ValueError:
        raise ProxyError(400, "'pool' must be 'prefill' or 'decode'", param="pool") from None
    inst = st.registry.add(url, pool, Origin.ADMIN)
    if inst.pool is not pool:
        raise ProxyError(409, f"{inst.url} is already in the {inst.pool.value} pool")
    await probe_instance(st.registry, st.probes, inst, st.cfg.probe_timeout_s)
    return web.json_response(inst.to_json(), status=201)


@admin_only
async def remove_instance(request: web.Request) -> web.Response:
    """Remove an instance (a dynamic one comes back with its next heartbeat: drain it)."""
    _, url = await _json_object(request)
    if not request.app[STATE_KEY].registry.remove(url):
        raise ProxyError(404, f"no instance {url}")
    return web.json_response({"removed": url})


@admin_only
async def drain_instance(request: web.Request) -> web.Response:
    """Send no new requests to an instance; its in-flight requests finish."""
    _, url = await _json_object(request)
    inst = request.app[STATE_KEY].registry.drain(url)
    if inst is None:
        raise ProxyError(404, f"no instance {url}")
    return web.json_response(inst.to_json())


@admin_only
async def resume_instance(request: web.Request) -> web.Response:
    """Undo a drain: the instance rejoins after a successful probe."""
    st = request.app[STATE_KEY]
    _, url = await _json_object(request)
    inst = st.registry.get(url)
    if inst is None:
        raise ProxyError(404, f"no instance {url}")
    inst.state = InstanceState.PENDING
    await probe_instance(st.registry, st.probes, inst, st.cfg.probe_timeout_s)
    return web.json_response(inst.to_json())


def add_admin_routes(app: web.Application) -> None:
    """Attach the admin routes."""
    app.router.add_get("/admin/instances", list_instances)
    app.router.add_post("/admin/instances", add_instance)
    app.router.add_delete("/admin/instances", remove_instance)
    app.router.add_post("/admin/instances/drain", drain_instance)
    app.router.add_post("/admin/instances/resume", resume_instance)
