"""The fault matrix: every injected fault x {tcp, nixl host memory} x {read, write}.

Real prefill and decode processes with ``DISAGG_FAULT_INJECTION=1`` and ``verify_kv``; the rules
are swapped between cases through ``POST /v1/kv_faults`` (connectors/faults.py). For every
case: each request either returns exactly the monolithic greedy tokens or an error response,
never a 200 with other tokens; a fault that must break the transfer breaks it and raises the
counter that names it; both engines keep serving; both ledgers are clean once idle.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import requests  # type: ignore[import-untyped]
from pd_helpers import BASE, info, kv_config, metric, pd_request, wait_clean
from support import Instance, start_instances

TIMEOUTS = {"transfer_timeout": 2, "defer_timeout": 2, "lease_timeout": 1.5,
            "heartbeat_interval": 0.3}
PROMPTS = [[(5 * i + n) % 200 + 1 for i in range(n)] for n in (1, 17, 40)]
FAILED = ("transfers_failed_total", "transfers_expired_total")
REFUSED = ("kv_refused_total",)


def _nixl_ok() -> bool:
    try:
        import nixl  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Case:
    """One fault: where it is injected, in which modes, and what it must cause."""

    name: str
    side: str
    """p or d: the engine whose rules are set."""
    rules: list[dict[str, Any]]
    modes: tuple[str, ...]
    must_fail: tuple[str, ...] = ()
    """Consumer counters of which at least one must rise (empty: the fault may be absorbed)."""


CASES = [
    Case("drop release", "d", [{"at": "release", "action": "drop"}], ("read",), FAILED),
    Case("drop release_ack", "p", [{"at": "release_ack", "action": "drop"}], ("read",), FAILED),
    Case("corrupt release_ack", "p", [{"at": "release_ack", "action": "corrupt"}], ("read",),
         FAILED),
    Case("drop remote_blocks", "d", [{"at": "remote_blocks", "action": "drop"}], ("write",),
         FAILED),
    Case("corrupt remote_blocks", "d", [{"at": "remote_blocks", "action": "corrupt"}],
         ("write",), FAILED),
    Case("drop write_done", "p", [{"at": "write_done", "action": "drop"}], ("write",), FAILED),
    Case("fail post", "poster", [{"at": "post", "action": "fail"}], ("read", "write"), FAILED),
    Case("stall post", "poster", [{"at": "post", "action": "stall"}], ("read", "write"),
         FAILED),
    Case("flip a landed byte", "d", [{"at": "landed", "action": "flip"}], ("read", "write"),
         REFUSED),
    Case("duplicate every message", "both", [{"at": "notify", "action": "duplicate"}],
         ("read", "write")),
    Case("delay every message", "both", [{"at": "notify", "action": "delay", "s": 0.5}],
         ("read", "write")),
    Case("drop leases of slow transfers", "both", [{"at": "lease", "action": "drop"}, {
        "at": "notify", "action": "delay", "s": 0.8}], ("read", "write")),
    Case("drop the second post", "poster", [{"at": "post", "nth": 2, "action": "fail"}],
         ("read", "write")),
]


@dataclass
class Deployment:
    """A faulty P/D pair and the monolithic tokens of every prompt. Each request names its
    mode (``pd_request``), so one pair per transport serves the READ and the WRITE cases."""

    transport: str
    p: Instance
    d: Instance
    p_info: dict[str, Any]
    d_info: dict[str, Any]
    expected: list[list[int]]


DATA_PATH = ("fail post", "stall post", "flip a landed byte", "drop the second post")
"""Faults on the transport's own path (posts, landed bytes); the others act on the control
messages above any transport."""


def _matrix() -> list[Any]:
    """(transport, mode, case) for every case in each of its modes. Default: every fault in both
    its modes over tcp, plus nixl READ's data-path faults. Slow: nixl READ's control-message
    faults (covered by the same fault and mode over tcp by default: they never reach the
    transport's code) and nixl WRITE (its control faults run over tcp WRITE by default, nixl's
    data path over nixl READ)."""
    out = []
    for transport in ("tcp", "nixl"):
        for mode in ("read", "write"):
            for case in CASES:
                if mode not in case.modes:
                    continue
                marks: list[Any] = []
                if transport == "nixl":
                    marks.append(pytest.mark.skipif(not _nixl_ok(),
                                                    reason="nixl is not installed"))
                    # slow: nixl READ's control faults (default: same fault+mode over tcp) and
                    # nixl WRITE (default: tcp WRITE for its faults, nixl READ for nixl's path)
                    if mode == "write" or case.name not in DATA_PATH:
                        marks.append(pytest.mark.slow)
                out.append(pytest.param(transport, mode, case, marks=marks,
                                        id=f"{transport}-{mode}-{case.name.replace(' ', '-')}"))
    return out


@pytest.fixture(scope="module")
def deployment(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    transport = request.param
    tmp = tmp_path_factory.mktemp(f"faults-{transport}")
    env = {"DISAGG_FAULT_INJECTION": "1"}
    extra = {**TIMEOUTS, "verify_kv": True}
    # the same prompts every case: a decode-side prefix hit would move nothing
    started = start_instances(
        [[*BASE, "--no-enable-prefix-caching", "--kv-transfer-config",
          kv_config(role, "read", transport, **extra)] for role in ("kv_producer", "kv_consumer")],
        tmp, env=env)
    try:
        p, d = started
        expected = [_generate(p.url, prompt) for prompt in PROMPTS]
        yield Deployment(transport, p, d, info(p.url), info(d.url), expected)
    finally:
        for inst in started:  # both stop at once; stop() then waits for each
            inst.proc.terminate()
        for inst in started:
            inst.stop()


def _body(prompt: list[int]) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}


def _generate(url: str, prompt: list[int]) -> list[int]:
    r = requests.post(url + "/v1/completions", json=_body(prompt), timeout=60)
    assert r.status_code == 200, r.text
    return list(r.json()["choices"][0]["token_ids"])


def _set_faults(url: str, rules: list[dict[str, Any]]) -> None:
    r = requests.post(url + "/v1/kv_faults", json={"faults": rules}, timeout=10)
    assert r.status_code == 200, r.text


def _counters(url: str, names: tuple[str, ...]) -> float:
    return sum(metric(url, f"disagg_kv_connector_{n}") for n in names)


def _rose(urls: list[str], names: tuple[str, ...], before: float, timeout_s: float = 5.0) -> bool:
    """The summed counters exceed ``before`` within the deadline (/metrics shows the engine's
    last stats message, which can trail the responses by a step)."""
    deadline = time.monotonic() + timeout_s
    while sum(_counters(u, names) for u in urls) <= before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


async def _run_all(dep: Deployment, mode: str) -> list[tuple[int, dict[str, Any]]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        return await asyncio.gather(*(
            pd_request(s, dep.p.url, dep.d.url, _body(prompt), mode, dep.p_info,
                       dep.d_info) for prompt in PROMPTS))


def _outcome(status: int, body: dict[str, Any], expected: list[int]) -> str:
    """equal (200, monolithic tokens), error (4xx/5xx with a message), wrong or bad_error."""
    if status == 200:
        return "equal" if body["choices"][0]["token_ids"] == expected else "wrong"
    ok = 400 <= status < 600 and bool(body.get("error", {}).get("message"))
    return "error" if ok else "bad_error"


def _record(dep: Deployment, mode: str, case: Case, outcomes: list[str]) -> None:
    """Append this case's counts where ``python -m bench.fault_matrix`` collects them."""
    path = os.environ.get("DISAGG_FAULT_MATRIX_OUT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"transport": dep.transport, "mode": mode, "fault": case.name,
                                **{k: outcomes.count(k) for k in ("equal", "error", "wrong",
                                                                  "bad_error")}}) + "\n")


# slow cases: nixl READ's control faults (default over tcp READ), nixl WRITE (default: tcp WRITE)
@pytest.mark.parametrize(("deployment", "mode", "case"), _matrix(), indirect=["deployment"],
                         scope="module")
def test_fault_never_yields_wrong_tokens(deployment: Deployment, mode: str, case: Case) -> None:
    dep = deployment
    poster = "d" if mode == "read" else "p"
    sides = {"p": ["p"], "d": ["d"], "both": ["p", "d"], "poster": [poster]}[case.side]
    before = _counters(dep.d.url, case.must_fail) if case.must_fail else 0.0
    injected = sum(_counters(getattr(dep, x).url, ("faults_injected_total",)) for x in sides)
    for side in sides:
        _set_faults(getattr(dep, side).url, case.rules)
    try:
        results = asyncio.run(_run_all(dep, mode))
    finally:
        for side in ("p", "d"):
            _set_faults(getattr(dep, side).url, [])
    outcomes = [_outcome(status, body, expected)
                for (status, body), expected in zip(results, dep.expected)]
    _record(dep, mode, case, outcomes)
    assert "wrong" not in outcomes, (case.name, results)
    assert all(o != "bad_error" for o in outcomes), (case.name, results)
    if case.must_fail:
        # the transfers that move KV failed (counted); each request ended with a clear error
        # or, when the prefill's first token had already gone out, computed its prompt on
        # the decode (equal: the monolithic tokens), never a 200 on foreign KV (above)
        assert _rose([dep.d.url], case.must_fail, before), case.name
    urls = [getattr(dep, x).url for x in sides]
    assert _rose(urls, ("faults_injected_total",), injected), "the fault never fired"
    wait_clean(dep.p.url, timeout_s=15)
    wait_clean(dep.d.url, timeout_s=15)
    for inst in (dep.p, dep.d):  # the engines survived and still serve
        assert inst.proc.poll() is None
        assert _generate(inst.url, PROMPTS[1]) == dep.expected[1]
    assert os.environ.get("DISAGG_FAULT_INJECTION") != "1"  # only the engines inject
