"""The registry: states, role/mode checks, heartbeat expiry, load accounting."""

from __future__ import annotations

import pytest

from proxy.config import TransferMode
from proxy.registration import Heartbeat, InstanceInfo, KVRole
from proxy.registry import (
    DOWN_AFTER_EXTRA_FAILURES,
    InstanceState,
    Origin,
    Pool,
    Registry,
    check_info,
    normalize_url,
    pool_for_role,
)


def _info(role: KVRole, mode: TransferMode | None = TransferMode.READ,
          url: str = "http://127.0.0.1:9100", max_model_len: int = 4096,
          kv_host: str | None = "127.0.0.1") -> InstanceInfo:
    return InstanceInfo(role=role, mode=mode, engine_id="e1", http_url=url,
                        max_model_len=max_model_len, kv_host=kv_host, kv_handshake_port=1,
                        kv_notify_port=2, model="builtin:tiny-llama")


def test_normalize_url() -> None:
    assert normalize_url("127.0.0.1:80/") == "http://127.0.0.1:80"
    assert normalize_url(" http://h:1 ") == "http://h:1"
    with pytest.raises(ValueError, match="must be http"):
        normalize_url("ftp://h:1")


def test_check_info_roles_and_modes() -> None:
    read = TransferMode.READ
    assert check_info(_info(KVRole.PRODUCER), Pool.PREFILL, read) is None
    assert check_info(_info(KVRole.BOTH), Pool.DECODE, read) is None
    assert "cannot serve in the decode pool" in str(
        check_info(_info(KVRole.PRODUCER), Pool.DECODE, read))
    assert "KV mode write" in str(
        check_info(_info(KVRole.CONSUMER, TransferMode.WRITE), Pool.DECODE, read))
    assert "WRITE mode needs" in str(
        check_info(_info(KVRole.CONSUMER, TransferMode.WRITE, kv_host=None), Pool.DECODE,
                   TransferMode.WRITE))
    assert pool_for_role(KVRole.PRODUCER) is Pool.PREFILL
    assert pool_for_role(KVRole.BOTH) is Pool.DECODE


def test_probe_verdicts_move_the_state() -> None:
    reg = Registry(TransferMode.READ)
    inst = reg.add("http://127.0.0.1:9100", Pool.PREFILL, Origin.STATIC)
    assert inst.state is InstanceState.PENDING and reg.healthy(Pool.PREFILL) == []
    reg.apply_info(inst, _info(KVRole.PRODUCER))
    assert reg.healthy(Pool.PREFILL) == [inst]
    reg.mark_failed(inst, "connection refused")
    assert inst.state is InstanceState.UNHEALTHY and inst.last_error == "connection refused"
    reg.apply_info(inst, _info(KVRole.PRODUCER))
    assert inst.state is InstanceState.HEALTHY and inst.last_error is None
    reg.apply_info(inst, _info(KVRole.PRODUCER, TransferMode.WRITE))
    assert inst.state is InstanceState.REJECTED
    assert reg.add("127.0.0.1:9100", Pool.PREFILL, Origin.ADMIN) is inst


def test_slow_probes_count_before_an_instance_leaves() -> None:
    reg = Registry(TransferMode.READ, unhealthy_after_failures=3)
    inst = reg.add("http://127.0.0.1:9100", Pool.PREFILL, Origin.STATIC)
    reg.apply_info(inst, _info(KVRole.PRODUCER))
    reg.mark_failed(inst, "timed out", definite=False)
    reg.mark_failed(inst, "timed out", definite=False)
    assert inst.state is InstanceState.HEALTHY and inst.consecutive_failures == 2
    reg.apply_info(inst, _info(KVRole.PRODUCER))  # a good probe resets the count
    for _ in range(3):
        reg.mark_failed(inst, "timed out", definite=False)
    assert inst.state is InstanceState.UNHEALTHY


def test_requests_stop_waiting_only_on_a_dead_or_long_frozen_instance() -> None:
    """Slow probes take an instance out of rotation; the requests already on it are given up
    only when it refuses connections or its probes keep failing for
    DOWN_AFTER_EXTRA_FAILURES more rounds (a busy instance answers in between)."""
    reg = Registry(TransferMode.READ, unhealthy_after_failures=3)
    inst = reg.add("http://127.0.0.1:9100", Pool.DECODE, Origin.STATIC)
    reg.apply_info(inst, _info(KVRole.CONSUMER))
    for _ in range(3 + DOWN_AFTER_EXTRA_FAILURES - 1):
        reg.mark_failed(inst, "timed out", definite=False)
        assert not reg.given_up(inst, definite=False)
    assert inst.state is InstanceState.UNHEALTHY
    reg.mark_failed(inst, "timed out", definite=False)
    assert reg.given_up(inst, definite=False)
    inst.down.set()
    reg.apply_info(inst, _info(KVRole.CONSUMER))  # back: a fresh signal for new requests
    assert inst.state is InstanceState.HEALTHY and not inst.down.is_set()
    reg.mark_failed(inst, "connection refused")
    assert reg.given_up(inst, definite=True)


def test_drain_keeps_the_instance_listed_but_unroutable() -> None:
    reg = Registry(TransferMode.READ)
    inst = reg.add("http://127.0.0.1:9100", Pool.DECODE, Origin.STATIC)
    reg.apply_info(inst, _info(KVRole.CONSUMER))
    assert reg.drain(inst.url) is inst
    reg.apply_info(inst, _info(KVRole.CONSUMER))
    assert inst.state is InstanceState.DRAINING
    assert reg.healthy(Pool.DECODE) == [] and reg.instances() == [inst]
    assert reg.remove(inst.url) and not reg.remove(inst.url)


def test_heartbeats_register_refresh_and_expire() -> None:
    reg = Registry(TransferMode.READ, max_missed_heartbeats=3)
    beat = Heartbeat(info=_info(KVRole.CONSUMER), interval_s=1.0, seq=0)
    inst = reg.on_heartbeat(beat, now_s=100.0)
    assert inst is not None and inst.origin is Origin.DYNAMIC
    assert reg.healthy(Pool.DECODE) == [inst]
    assert reg.expire(now_s=102.5) == []
    reg.on_heartbeat(beat, now_s=102.5)
    assert reg.expire(now_s=105.0) == []
    assert reg.expire(now_s=105.6) == [inst]
    assert reg.instances() == []


def test_static_instances_never_expire() -> None:
    reg = Registry(TransferMode.READ)
    inst = reg.add("http://127.0.0.1:9100", Pool.DECODE, Origin.STATIC)
    reg.on_heartbeat(Heartbeat(info=_info(KVRole.CONSUMER), interval_s=1.0, seq=0), now_s=0.0)
    assert reg.expire(now_s=1e9) == [] and reg.instances() == [inst]


def test_load_accounting_and_pool_facts() -> None:
    reg = Registry(TransferMode.READ)
    a = reg.add("http://127.0.0.1:1", Pool.PREFILL, Origin.STATIC)
    b = reg.add("http://127.0.0.1:2", Pool.DECODE, Origin.STATIC)
    reg.apply_info(a, _info(KVRole.PRODUCER, max_model_len=8192))
    reg.apply_info(b, _info(KVRole.CONSUMER, max_model_len=2048))
    reg.acquire(a, 100)
    reg.acquire(a, 20)
    reg.release(a, 100)
    assert (a.outstanding_requests, a.outstanding_tokens, a.total_requests) == (1, 20, 2)
    assert reg.min_max_model_len() == 2048
    assert reg.model_name() == "builtin:tiny-llama"
    assert a.to_json()["state"] == "healthy" and a.to_json()["outstanding_tokens"] == 20
