"""KV moves only between two requests for the very same prompt, and a READ decode uses only
the blocks the prefill holds for that transfer: kv_transfer_params that a proxy garbled or
mixed up (block ids shifted, reversed or another transfer's; a different prompt of the same
length) are refused (the request fails or, with kv_load_failure_policy recompute, is computed
here), never decoded on another prompt's KV with a 200. Engines in this process over loopback
TCP."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from pd_helpers import engine_remote, pd_engine

from connectors.transfer import prompt_digest
from disagg.common.kv_transfer_params import KVTransferParams, TransferMode
from disagg.common.protocol import EngineCoreOutput, EngineCoreRequest
from disagg.common.sampling_params import SamplingParams
from disagg.engine.engine_core import EngineCore
from disagg.llm import LLM

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _prompt(salt: int, n: int = 40) -> list[int]:
    return [(11 * salt + 5 * i) % 240 + 3 for i in range(n)]


@pytest.fixture
def make() -> Iterator[Callable[..., EngineCore]]:
    made: list[EngineCore] = []

    def engine(role: str, mode: str, policy: str = "fail") -> EngineCore:
        e = pd_engine(role, mode, kv_load_failure_policy=policy, transfer_timeout=2,
                      defer_timeout=2, lease_timeout=2, heartbeat_interval=0.25)
        made.append(e)
        return e

    _seen.clear()
    yield engine
    for e in made:
        e.close()


_seen: dict[str, EngineCoreOutput] = {}
"""Finished outputs stepped past while waiting for another request (one test at a time)."""


def _finish(engines: list[EngineCore], rid: str, timeout_s: float = 20.0) -> EngineCoreOutput:
    """Step until ``rid`` finished: its output with every token it streamed."""
    tokens: dict[str, list[int]] = {}
    deadline = time.monotonic() + timeout_s
    while rid not in _seen:
        assert time.monotonic() < deadline, f"{rid} did not finish within {timeout_s} s"
        for engine in engines:
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    _seen[out.request_id] = msgspec.structs.replace(
                        out, new_token_ids=tokens.pop(out.request_id))
        time.sleep(0.001)
    return _seen.pop(rid)


def _hold(prefill: EngineCore, rid: str, prompt: list[int]) -> KVTransferParams:
    """A READ prefill of ``prompt``; its answer's params (its blocks held for the decode)."""
    prefill.add_request(EngineCoreRequest(
        request_id=rid, prompt_token_ids=prompt,
        sampling_params=msgspec.structs.replace(GREEDY, max_tokens=1),
        kv_transfer_params=KVTransferParams(transfer_id=uuid.uuid4().hex,
                                            do_remote_decode=True, mode=TransferMode.READ)))
    out = _finish([prefill], rid)
    assert out.kv_transfer_params is not None, out.error
    return msgspec.structs.replace(out.kv_transfer_params, do_remote_prefill=True)


def _monolithic(prompt: list[int]) -> list[int]:
    llm = LLM("builtin:tiny-llama", device="cpu", kv_cache_memory_bytes=4 * 2**20,
              max_model_len=256, enable_prefix_caching=False)
    try:
        return llm.generate([prompt], GREEDY)[0].output_token_ids
    finally:
        llm.close()


def _clean(*engines: EngineCore, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(e.pool.snapshot().free == e.pool.snapshot().total
                  and e.pool.snapshot().held == 0 for e in engines):
        assert time.monotonic() < deadline, [e.pool.snapshot() for e in engines]
        for e in engines:
            e.step()
        time.sleep(0.01)


GARBLE: dict[str, Callable[[list[int], list[int]], list[int]]] = {
    "shifted": lambda ids, other: [i + 3 for i in ids],
    "reversed": lambda ids, other: ids[::-1],
    "another transfer's": lambda ids, other: other,
}


@pytest.mark.parametrize("policy", ["fail", "recompute"])
@pytest.mark.parametrize("garble", sorted(GARBLE))
def test_read_refuses_blocks_that_are_not_the_hold(make: Any, garble: str, policy: str) -> None:
    prefill, decode = make("kv_producer", "read"), make("kv_consumer", "read", policy)
    prompt = _prompt(1)
    params = _hold(prefill, "p", prompt)
    other = _hold(prefill, "q", _prompt(2))  # held too, same length: its blocks are valid ids
    assert params.remote_block_ids is not None and other.remote_block_ids is not None
    bad = msgspec.structs.replace(params, remote_block_ids=GARBLE[garble](
        list(params.remote_block_ids), list(other.remote_block_ids)))
    decode.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=prompt,
                                         sampling_params=GREEDY, kv_transfer_params=bad))
    out = _finish([decode, prefill], "d")
    assert decode.connector.metrics()["kv_refused_total"] == 1
    if out.error is not None:  # policy fail, refused before the first token went out
        assert policy == "fail" and "not the prefill's hold" in out.error, out.error
        assert not out.new_token_ids
    else:  # recomputed here (a request whose first token went out always is)
        assert out.new_token_ids == _monolithic(prompt)
    prefill.kv_abort(other.transfer_id)
    _clean(prefill, decode)


def test_read_refuses_the_kv_of_another_prompt(make: Any) -> None:
    prefill, decode = make("kv_producer", "read"), make("kv_consumer", "read")
    params = _hold(prefill, "p", _prompt(1))
    decode.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=_prompt(3),
                                         sampling_params=GREEDY, kv_transfer_params=params))
    out = _finish([decode, prefill], "d")
    assert out.error is not None and "another prompt" in out.error, out.error
    assert not out.new_token_ids  # not even the prefill's first token (another prompt's)
    prefill.kv_abort(params.transfer_id)  # the proxy's cleanup frees P's hold at once
    _clean(prefill, decode)


def test_read_refuses_the_kv_of_another_prompt_even_when_params_lie(make: Any) -> None:
    """Params whose prompt digest was made to match the decode's: P's release_ack names its
    own prompt, and the decode refuses the KV it read."""
    prefill, decode = make("kv_producer", "read"), make("kv_consumer", "read")
    params = _hold(prefill, "p", _prompt(1))
    lie = msgspec.structs.replace(params, remote_prompt_digest=prompt_digest(_prompt(3)).hex(),
                                  first_token_id=None)
    decode.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=_prompt(3),
                                         sampling_params=GREEDY, kv_transfer_params=lie))
    out = _finish([decode, prefill], "d")
    assert out.error is not None and "another prompt" in out.error, out.error
    assert decode.connector.metrics()["kv_refused_total"] == 1
    _clean(prefill, decode)


def test_write_prefill_writes_nothing_into_another_prompts_blocks(make: Any) -> None:
    prefill, decode = make("kv_producer", "write"), make("kv_consumer", "write", "recompute")

    tid = uuid.uuid4().hex
    decode.add_request(EngineCoreRequest(
        request_id="d", prompt_token_ids=_prompt(3), sampling_params=GREEDY,
        kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_prefill=True,
                                            mode=TransferMode.WRITE, **engine_remote(prefill))))
    prefill.add_request(EngineCoreRequest(
        request_id="p", prompt_token_ids=_prompt(1),
        sampling_params=msgspec.structs.replace(GREEDY, max_tokens=1),
        kv_transfer_params=KVTransferParams(transfer_id=tid, do_remote_decode=True,
                                            mode=TransferMode.WRITE, **engine_remote(decode))))
    out = _finish([decode, prefill], "d")
    assert out.error is None and out.new_token_ids == _monolithic(_prompt(3))  # recomputed
    p_out = _finish([prefill, decode], "p")
    assert p_out.error is not None and "not this prefill's" in p_out.error, p_out.error
    assert prefill.connector.metrics()["bytes_moved_total"] == 0
    _clean(prefill, decode)


@pytest.mark.parametrize("case", ["write-with-a-read-hold", "read-without-the-digest",
                                  "read-token-count"])
def test_params_that_cannot_describe_the_transfer_fail_at_once(make: Any, case: str) -> None:
    """kv_transfer_params that cannot describe this request's transfer end it at once with
    an error naming them, not after a timeout: a READ answer sent with mode write (it used to
    wait 60 s for a write that never comes), a READ answer without the prompt digest, one
    whose token count is not the prompt's."""
    prefill, decode = make("kv_producer", "read"), make("kv_consumer", "read")
    prompt = _prompt(1)
    params = _hold(prefill, "p", prompt)
    bad = {"write-with-a-read-hold": msgspec.structs.replace(params, mode=TransferMode.WRITE),
           "read-without-the-digest": msgspec.structs.replace(params,
                                                              remote_prompt_digest=None),
           "read-token-count": msgspec.structs.replace(params, remote_num_tokens=39)}[case]
    decode.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=prompt,
                                         sampling_params=GREEDY, kv_transfer_params=bad))
    started = time.monotonic()
    out = _finish([decode], "d")
    assert time.monotonic() - started < 1.0
    assert out.error is not None and not out.new_token_ids
    assert out.error.startswith("KV transfer failed: kv_transfer_params "), out.error
    prefill.kv_abort(params.transfer_id)
    _clean(prefill, decode)


def test_read_notifies_the_prefill_where_its_handshake_says(make: Any) -> None:
    """A wrong ``remote_notify_port`` (the proxy's copy of the prefill's address) does not
    strand the transfer until its timeout: once the handshake identified the prefill, the
    decode sends to the notify port the prefill itself gave."""
    prefill, decode = make("kv_producer", "read"), make("kv_consumer", "read")
    prompt = _prompt(1)
    params = _hold(prefill, "p", prompt)
    assert params.remote_notify_port is not None
    wrong = msgspec.structs.replace(params, remote_notify_port=params.remote_notify_port + 7)
    decode.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=prompt,
                                         sampling_params=GREEDY, kv_transfer_params=wrong))
    out = _finish([decode, prefill], "d")
    assert out.error is None and out.new_token_ids == _monolithic(prompt)
    _clean(prefill, decode)
    for engine in (prefill, decode):  # P's hold released by the decode's ack, not expired
        assert engine.connector.metrics()["transfers_expired_total"] == 0


def test_a_peer_that_forgot_the_decode_is_handshaken_again_after_one_expiry(make: Any) -> None:
    """P lost D from its peer table (a flood of strangers' handshakes, a bug): D's release
    is dropped as unidentified and that transfer expires, after which D handshakes afresh
    (it reused its cached hello forever before) and the next request goes through."""
    prefill, decode = make("kv_producer", "read"), make("kv_consumer", "read")
    prompt = _prompt(1)
    for rid in ("d0", "d1", "d2"):
        params = _hold(prefill, "p" + rid, prompt)
        if rid == "d1":
            prefill.connector.peers.known.clear()
        decode.add_request(EngineCoreRequest(request_id=rid, prompt_token_ids=prompt,
                                             sampling_params=GREEDY, kv_transfer_params=params))
        out = _finish([decode, prefill], rid)
        # d1: P drops D's release as unidentified and D's wait for the ack expires; its
        # first token went out already, so it is recomputed here: the same tokens
        assert out.error is None and out.new_token_ids == _monolithic(prompt)
        expired = decode.connector.metrics()["transfers_expired_total"]
        assert expired == (0 if rid == "d0" else 1), rid  # d2 went through
    assert prefill.connector.peers.identify(decode.connector.engine_id,
                                            decode.connector.epoch) is not None
    _clean(prefill, decode)
