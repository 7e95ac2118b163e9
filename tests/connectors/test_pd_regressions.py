"""Regressions of reported P/D connector bugs, each over real `disagg serve` processes (tcp).

Every test's docstring says how it reproduces its report; each fails on a build with the bug.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import msgspec
import requests  # type: ignore[import-untyped]
import zmq
from pd_helpers import (
    BASE,
    alive,
    compatible_metadata,
    engine_core,
    handshake,
    info,
    kv_config,
    metric,
    metric_at_least,
    pd_request,
    push_frames,
    remote_of,
    wait_clean,
)
from support import free_port

from connectors.protocol import Lease, RemoteBlocks, encoder
from connectors.transfer import prompt_digest

TIMEOUTS: dict[str, Any] = {"transfer_timeout": 2, "defer_timeout": 2, "lease_timeout": 1.5,
                            "heartbeat_interval": 0.3}
DEFER_S = TIMEOUTS["defer_timeout"]
KV = "disagg_kv_connector_"


def _prompt(num_tokens: int, salt: int) -> list[int]:
    return [(7 * i + 13 * salt) % 240 + 1 for i in range(num_tokens)]


def _complete(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = requests.post(url + "/v1/completions", json=body, timeout=60)
    return r.status_code, r.json()


def _body(prompt: list[int], max_tokens: int = 4, **kv: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    return {**body, "kv_transfer_params": kv} if kv else body


def _tokens(url: str, prompt: list[int]) -> list[int]:
    status, out = _complete(url, _body(prompt))
    assert status == 200, out
    return list(out["choices"][0]["token_ids"])


def _error(status: int, out: dict[str, Any]) -> str:
    """The message of an error response (AssertionError if it is not one)."""
    assert 400 <= status < 600, (status, out)
    return str(out["error"]["message"])


def _serves(inst: Any) -> None:
    """The instance and its engine core are alive and answer a plain request."""
    assert alive(inst), inst.log()[-3000:]
    assert engine_core(inst.proc.pid).is_running()
    assert _complete(inst.url, _body(_prompt(5, 99), max_tokens=2))[0] == 200


def _read_prefill(url: str, tid: str, prompt: list[int]) -> dict[str, Any]:
    """A READ prefill on P; the decode's kv_transfer_params."""
    status, out = _complete(url, _body(prompt, 1, transfer_id=tid, do_remote_decode=True,
                                       mode="read"))
    assert status == 200, out
    return {**out["kv_transfer_params"], "do_remote_prefill": True}


def _cycle_pool(url: str, pool: ThreadPoolExecutor) -> None:
    """Monolithic requests that allocate every block of the pool twice over (the free list
    is FIFO), so any block freed earlier now holds other KV."""
    num_blocks = int(info(url)["num_gpu_blocks"])
    bodies = [_body(_prompt(240, 100 + k), 1) for k in range(2 * num_blocks // 15 + 1)]
    for status, out in pool.map(lambda b: _complete(url, b), bodies):
        assert status == 200, out


# ---- a. READ: decode frozen past the timeouts ------------------------------------------------
def test_read_decode_frozen_past_the_timeouts_never_uses_freed_kv(instance_factory) -> None:
    """Report: with a decode frozen past the prefill's timeouts, P's holds expire and free
    their blocks, P reuses them, and the thawed decode read them and answered 200 with wrong
    tokens. Reproduced: 8 READ prefills on P, D's engine core SIGSTOPped, the 8 decode
    requests sent to D (its frontend queues them: its stall deadline is raised so that it
    does not fail them first), P's holds expire, monolithic traffic rewrites P's whole pool,
    SIGCONT. Each answer is an error or exactly the monolithic tokens, D refuses the KV it
    read after P freed it (release_ack held=false, verify_kv off), both ledgers end clean."""
    cfg = {**TIMEOUTS, "verify_kv": False}
    p, d = instance_factory.many(
        [*BASE, "--kv-cache-memory-bytes", "4MiB", "--max-model-len", "256",
         "--kv-transfer-config", kv_config("kv_producer", "read", **cfg)],
        [*BASE, "--kv-transfer-config", kv_config("kv_consumer", "read", **cfg)],
        env={"DISAGG_ENGINE_STALL_TIMEOUT_S": "120"})  # P's stall timeout too: harmless
    prompts = [_prompt(40, k) for k in range(8)]
    expected = [_tokens(p.url, x) for x in prompts]
    params = [_read_prefill(p.url, f"frozen-{k}", x) for k, x in enumerate(prompts)]
    core = engine_core(d.proc.pid)
    with ThreadPoolExecutor(16) as pool:  # 8 wait on D, 8 drive P
        core.suspend()
        try:
            answers = [pool.submit(_complete, d.url, {**_body(x), "kv_transfer_params": kv})
                       for x, kv in zip(prompts, params)]
            time.sleep(1.0)  # the decode requests reached D and wait in its engine's queue
            wait_clean(p.url, timeout_s=6)  # P's holds expired: every block is free
            _cycle_pool(p.url, pool)
            assert not any(a.done() for a in answers), "D answered while frozen"
        finally:
            core.resume()
        results = [a.result() for a in answers]
    for (status, out), tokens in zip(results, expected):
        if status != 200:
            _error(status, out)
        else:
            assert out["choices"][0]["token_ids"] == tokens
    assert metric_at_least(d.url, KV + "kv_refused_total", 1) >= 1
    wait_clean(p.url)
    wait_clean(d.url)


# ---- b, c. WRITE: crafted remote_blocks --------------------------------------------------
def _start_write_prefill(pool: ThreadPoolExecutor, p: Any, tid: str, prompt: list[int],
                         decode: dict[str, Any]) -> Any:
    """A WRITE prefill on P toward ``decode`` (kv_transfer_params fields); returns its future
    once P's connector runs the transfer."""
    answer = pool.submit(_complete, p.url, _body(prompt, 1, transfer_id=tid,
                                                 do_remote_decode=True, mode="write", **decode))
    assert metric_at_least(p.url, KV + "transfers_active", 1) >= 1
    return answer


def _remote_blocks(**fields: Any) -> bytes:
    """A remote_blocks frame with any field values (a dict, so nothing checks them here),
    tagged exactly as connectors/protocol.py tags a real one."""
    real = msgspec.msgpack.decode(encoder.encode(RemoteBlocks(
        transfer_id="t", engine_id="e", epoch=0, generation=0, block_ids=[], num_tokens=0,
        host="h", handshake_port=1, notify_port=1)))
    assert real["type"] == "remote_blocks"
    return msgspec.msgpack.encode({**real, **fields})


def test_write_remote_blocks_with_ids_past_64_bits_are_dropped(instance_factory) -> None:
    """Report: a remote_blocks naming block ids 2**49+k and 2**64-1 for a live WRITE transfer
    made P write far outside any pool (or die). Reproduced: a WRITE prefill on P toward a fake
    decode address, then those frames on P's notify port. They are counted malformed, nothing
    is written, the prefill fails when its transfer expires at defer_timeout (or its handshake
    with the fake address times out), P stays clean and serving."""
    p = instance_factory([*BASE, "--kv-transfer-config",
                          kv_config("kv_producer", "write", **TIMEOUTS)])
    p_info = info(p.url)
    fake = {"remote_engine_id": "fake-decode", "remote_host": "127.0.0.1",
            "remote_handshake_port": free_port(), "remote_notify_port": free_port()}
    prompt = _prompt(40, 1)
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        answer = _start_write_prefill(pool, p, "crafted", prompt, fake)
        who = {"transfer_id": "crafted", "engine_id": "fake-decode", "epoch": 1,
               "generation": 1, "num_tokens": len(prompt) - 1, "host": "127.0.0.1",
               "handshake_port": fake["remote_handshake_port"],
               "notify_port": fake["remote_notify_port"]}
        push_frames(p_info["kv_host"], p_info["kv_notify_port"], [
            _remote_blocks(**who, block_ids=[2**49 + k for k in range(3)]),
            _remote_blocks(**who, block_ids=[0, 1, 2**64 - 1])])
        status, out = answer.result()
        elapsed = time.monotonic() - t0
    # the transfer expires at defer_timeout, or its handshake with the fake decode (nobody
    # listens there) times out first: both are 2 s, and either way nothing was written
    error = _error(status, out)
    assert "expired" in error or "did not answer the handshake" in error, error
    assert elapsed < DEFER_S + 2
    assert metric_at_least(p.url, KV + "notifications_malformed_total", 2) == 2
    assert metric(p.url, KV + "bytes_moved_total") == 0
    wait_clean(p.url)
    _serves(p)


def test_write_remote_blocks_outside_the_decode_pool_fail_the_transfer(
        instance_factory) -> None:
    """Report: a remote_blocks whose ids fit the wire bound (< 2**31) but not the decode's
    pool (>= its num_blocks) was written. Reproduced: a real decode D (so P's handshake with
    the claimed address succeeds), D's epoch learnt by a handshake of our own, then a
    remote_blocks for P's live WRITE transfer claiming D's engine id and epoch, with ids from
    D's num_blocks up to 2**31-1. P fails the transfer naming the pool bound and writes
    nothing; both ledgers clean."""
    p, d = instance_factory.many(
        [*BASE, "--kv-transfer-config", kv_config("kv_producer", "write", **TIMEOUTS)],
        [*BASE, "--kv-transfer-config", kv_config("kv_consumer", "write", **TIMEOUTS)])
    p_info, d_info = info(p.url), info(d.url)
    d_meta = handshake(d_info["kv_host"], d_info["kv_handshake_port"],
                       compatible_metadata(d_info, "regression-probe", 7)).metadata
    assert d_meta is not None and d_meta.engine_id == d_info["engine_id"]
    num_blocks = d_info["num_gpu_blocks"]
    prompt = _prompt(40, 2)  # 39 tokens of KV: 3 blocks of 16
    with ThreadPoolExecutor(1) as pool:
        answer = _start_write_prefill(pool, p, "outside", prompt, remote_of(d_info))
        push_frames(p_info["kv_host"], p_info["kv_notify_port"], [encoder.encode(RemoteBlocks(
            transfer_id="outside", engine_id=d_meta.engine_id, epoch=d_meta.epoch,
            generation=5, block_ids=[num_blocks, num_blocks + 1, 2**31 - 1],
            num_tokens=len(prompt) - 1, host=d_meta.host, handshake_port=d_meta.handshake_port,
            notify_port=d_meta.notify_port, prompt_digest=prompt_digest(prompt)))])
        status, out = answer.result()
    bound = f"block id {2**31 - 1} is outside peer {d_meta.engine_id}'s pool of {num_blocks}"
    assert bound in _error(status, out)  # a WRITE prefill answers with its transfer's end
    assert metric_at_least(p.url, KV + "transfers_failed_total", 1) == 1
    assert metric(p.url, KV + "bytes_moved_total") == 0
    wait_clean(p.url)
    wait_clean(d.url)
    _serves(p)


# ---- d. self-handshake -------------------------------------------------------------------
def test_a_handshake_with_itself_fails_fast_naming_the_settings(instance_factory) -> None:
    """Report: two hosts started with the same ``host``/``base_port`` settings make a decode
    handshake with itself, and the request hung until the deadlines. Reproduced: a READ
    decode given kv_transfer_params whose remote address is its own KV address (default 30 s
    and 60 s timeouts, so a hang shows). It fails within a few seconds with an error that
    names the settings; its ledger is clean."""
    d = instance_factory([*BASE, "--kv-transfer-config", kv_config("kv_consumer", "read")])
    own = {**remote_of(info(d.url)), "remote_engine_id": "prefill-on-another-host"}
    prompt = _prompt(40, 3)
    t0 = time.monotonic()
    status, out = _complete(d.url, _body(
        prompt, transfer_id="self", do_remote_prefill=True, mode="read", remote_epoch=1,
        remote_generation=1, remote_block_ids=[0, 1, 2], remote_num_tokens=len(prompt),
        remote_prompt_digest=prompt_digest(prompt).hex(), **own))
    message = _error(status, out)
    assert time.monotonic() - t0 < 5
    assert "is this engine itself" in message and "'base_port'" in message, message
    wait_clean(d.url)
    _serves(d)


# ---- e. leases from strangers --------------------------------------------------------------
def test_leases_from_strangers_do_not_keep_a_read_hold(instance_factory) -> None:
    """Report: anyone could keep a READ hold alive forever by leasing its transfer id.
    Reproduced: a READ prefill on P (its hold now waits for a decode that never comes) and
    leases for that transfer from an engine P never handshook, every 0.1 s. They are counted
    unidentified and the hold still expires at defer_timeout."""
    p = instance_factory([*BASE, "--kv-transfer-config",
                          kv_config("kv_producer", "read", **TIMEOUTS)])
    p_info = info(p.url)
    _read_prefill(p.url, "leased", _prompt(40, 4))
    t0 = time.monotonic()
    lease = encoder.encode(Lease(engine_id="stranger", epoch=random.randrange(2**62),
                                 transfer_ids=["leased"]))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    freed_s = None
    try:
        sock.connect(f"tcp://{p_info['kv_host']}:{p_info['kv_notify_port']}")
        while freed_s is None and time.monotonic() < t0 + DEFER_S + 5:
            sock.send(lease)
            if requests.get(p.url + "/v1/kv_ledger", timeout=5).json()["ranks"][0]["held"] == 0:
                freed_s = time.monotonic() - t0
            time.sleep(0.1)
    finally:
        sock.close(linger=0)
        ctx.term()
    assert freed_s is not None and freed_s < DEFER_S + 2.5, freed_s
    assert metric_at_least(p.url, KV + "transfers_expired_total", 1) == 1
    assert metric_at_least(p.url, KV + "notifications_unidentified_total", 5) >= 5
    wait_clean(p.url)


# ---- f, h. kv_transfer_params that cannot work -----------------------------------------------
def test_malformed_kv_transfer_params_are_400(instance_factory) -> None:
    """Report: malformed kv_transfer_params sent straight to an instance reached the engine.
    Reproduced: a string token count, a block id of 2**64, both roles at once, an unknown
    field. Each is HTTP 400 with an OpenAI error body; the engine core lives on and serves."""
    inst = instance_factory([*BASE, "--kv-transfer-config", kv_config("kv_consumer", "read")])
    base: dict[str, Any] = {"transfer_id": "bad", "do_remote_prefill": True}
    cases: list[dict[str, Any]] = [
        {"remote_num_tokens": "abc"}, {"remote_block_ids": [0, 2**64]},
        {"do_remote_decode": True}, {"surprise": 1}]
    for bad in cases:
        status, out = _complete(inst.url, _body(_prompt(8, 5), **base, **bad))
        assert status == 400, (bad, out)
        err = out["error"]
        assert err["message"] and err["type"] and err["code"] == 400, out
        assert "kv_transfer_params" in err["message"] + str(err["param"]), out
    _serves(inst)


def test_peer_addresses_zmq_cannot_connect_to_fail_only_their_request(
        instance_factory) -> None:
    """Report: one request whose kv_transfer_params named a host such as ``a b`` (within the
    255-character bound, but no ZMQ endpoint) killed the engine core: the transfer failed and
    telling that peer raised out of zmq connect inside the step. Same with a remote_blocks
    naming such a host for a live WRITE transfer. Reproduced on one instance: a READ decode,
    a WRITE prefill with such a host, and a WRITE prefill whose remote_blocks announces one;
    each request fails alone and the instance keeps serving."""
    inst = instance_factory([*BASE, "--kv-transfer-config",
                             kv_config("kv_both", "write", **TIMEOUTS)])
    i = info(inst.url)
    bad: dict[str, Any] = {"remote_engine_id": "peer", "remote_host": "a b",
                           "remote_handshake_port": 5, "remote_notify_port": 6}
    prompt = _prompt(40, 6)
    _error(*_complete(inst.url, _body(
        prompt, transfer_id="bad-read", do_remote_prefill=True, mode="read", remote_epoch=1,
        remote_generation=1, remote_block_ids=[0, 1, 2], remote_num_tokens=40, **bad)))
    _serves(inst)
    _error(*_complete(inst.url, _body(prompt, 1, transfer_id="bad-write",
                                      do_remote_decode=True, mode="write", **bad)))
    _serves(inst)
    fake = {**bad, "remote_host": "127.0.0.1"}
    with ThreadPoolExecutor(1) as pool:
        answer = _start_write_prefill(pool, inst, "bad-announce", prompt, fake)
        push_frames(i["kv_host"], i["kv_notify_port"], [encoder.encode(RemoteBlocks(
            transfer_id="bad-announce", engine_id="peer", epoch=1, generation=1,
            block_ids=[0, 1, 2], num_tokens=39, host="x/y", handshake_port=5, notify_port=6))])
        _error(*answer.result())
    _serves(inst)
    wait_clean(inst.url)


# ---- g. the handshake port survives junk -------------------------------------------------------
def test_junk_on_the_handshake_port_leaves_the_control_thread_serving(
        instance_factory) -> None:
    """Report: a single-frame ZMQ message or random bytes on the handshake port killed the
    control thread, so every later handshake timed out. Reproduced: a DEALER's one-frame
    message and 300 random bytes over raw TCP to P's handshake port, then a real READ P/D
    request: it returns the monolithic tokens, the envelope counted malformed."""
    p, d = instance_factory.many(
        [*BASE, "--kv-transfer-config", kv_config("kv_producer", "read", **TIMEOUTS)],
        [*BASE, "--kv-transfer-config", kv_config("kv_consumer", "read", **TIMEOUTS)])
    p_info, d_info = info(p.url), info(d.url)
    addr = (p_info["kv_host"], p_info["kv_handshake_port"])
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        dealer.connect(f"tcp://{addr[0]}:{addr[1]}")
        dealer.send(b"one frame, no envelope")
    finally:
        dealer.close(linger=2000)
        ctx.term()
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(random.Random(7).randbytes(300))
    assert metric_at_least(p.url, KV + "notifications_malformed_total", 1) >= 1
    prompt = _prompt(40, 7)
    expected = _tokens(p.url, prompt)

    async def go() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            return await pd_request(s, p.url, d.url, _body(prompt), "read", p_info, d_info)

    status, out = asyncio.run(go())
    assert status == 200 and out["choices"][0]["token_ids"] == expected, out
    wait_clean(p.url)
    wait_clean(d.url)
