"""The admin API: Bearer auth, list, add, remove, drain, resume."""

from __future__ import annotations

import asyncio
import json
from typing import Any

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


async def test_admin_api_is_off_without_a_key(proxies: Any, http: Any) -> None:
    proxy = await proxies(decode_urls=("http://127.0.0.1:9",))
    async with http.get(proxy.url + "/admin/instances", headers=AUTH) as resp:
        assert resp.status == 403
        assert "--admin-key" in (await resp.json())["error"]["message"]


async def test_admin_api_needs_the_right_bearer_key(proxies: Any, http: Any) -> None:
    proxy = await proxies(decode_urls=("http://127.0.0.1:9",), admin_key=KEY)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        async with http.get(proxy.url + "/admin/instances", headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "authentication_error"
    async with http.get(proxy.url + "/admin/instances", headers=AUTH) as resp:
        assert resp.status == 200
        (inst,) = (await resp.json())["instances"]
    assert inst["url"] == "http://127.0.0.1:9" and inst["state"] == "unhealthy"


async def test_add_remove_and_bad_requests(fakes: Any, proxies: Any, http: Any) -> None:
    d = await fakes(role="kv_consumer")
    proxy = await proxies(admin_key=KEY, registration_address=None,
                          prefill_urls=("http://127.0.0.1:9",))
    url = proxy.url + "/admin/instances"
    async with http.post(url, json={"url": d.url, "pool": "decode"}, headers=AUTH) as resp:
        assert resp.status == 201
        body = await resp.json()
    assert body["state"] == "healthy" and body["engine_id"] == d.engine_id
    async with http.post(url, json={"url": d.url, "pool": "prefill"}, headers=AUTH) as resp:
        assert resp.status == 409
    async with http.post(url, json={"url": d.url, "pool": "other"}, headers=AUTH) as resp:
        assert resp.status == 400 and "'pool'" in (await resp.json())["error"]["message"]
    async with http.post(url, data=b"{", headers=AUTH) as resp:
        assert resp.status == 400
    async with http.delete(url, json={"url": d.url}, headers=AUTH) as resp:
        assert resp.status == 200
    async with http.delete(url, json={"url": d.url}, headers=AUTH) as resp:
        assert resp.status == 404
    assert proxy.state.registry.get(d.url) is None


async def test_drain_stops_new_requests_and_resume_restores(fakes: Any, proxies: Any,
                                                            http: Any) -> None:
    p = await fakes(role="kv_producer")
    d1, d2 = await fakes(role="kv_consumer"), await fakes(role="kv_consumer")
    proxy = await proxies(admin_key=KEY, prefill_urls=(p.url,), decode_urls=(d1.url, d2.url))
    async with http.post(proxy.url + "/admin/instances/drain", json={"url": d1.url},
                         headers=AUTH) as resp:
        assert resp.status == 200 and (await resp.json())["state"] == "draining"
    for _ in range(4):
        async with http.post(proxy.url + "/v1/completions",
                             json={"model": "m", "prompt": "x"}) as resp:
            assert resp.status == 200
    assert len(d1.requests) == 0 and len(d2.requests) == 4
    async with http.post(proxy.url + "/admin/instances/resume", json={"url": d1.url},
                         headers=AUTH) as resp:
        assert resp.status == 200 and (await resp.json())["state"] == "healthy"
    async with http.post(proxy.url + "/admin/instances/drain", json={"url": "http://x:1"},
                         headers=AUTH) as resp:
        assert resp.status == 404


async def test_admin_bodies_that_cannot_be_decoded_are_400s(proxies: Any, http: Any) -> None:
    proxy = await proxies(decode_urls=("http://127.0.0.1:9",), admin_key=KEY)
    bodies = [b'{"url": ' + b"[" * 5000 + b"]" * 5000 + b"}",
              b'{"url": "h:1", "x": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
              b'{"url": 1e400}', b'{"url": NaN}', b'{"url": "\xff"}', b""]
    for body in bodies:
        for method in ("POST", "DELETE"):
            async with http.request(method, proxy.url + "/admin/instances", data=body,
                                    headers=AUTH) as resp:
                assert resp.status == 400, (method, body[:40])
                assert set((await resp.json())["error"]) == {"message", "type", "param",
                                                             "code"}


async def test_a_key_that_is_not_utf8_is_a_401(proxies: Any) -> None:
    proxy = await proxies(decode_urls=("http://127.0.0.1:9",), admin_key=KEY)
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /admin/instances HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Authorization: Bearer \xff\xed\xa0\x80" + KEY.encode() + b"\r\n\r\n")
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split()[1] == b"401"
    assert json.loads(body)["error"]["type"] == "authentication_error"
