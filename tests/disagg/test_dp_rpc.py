"""The RPC whitelist and its argument checks."""

import pytest

from disagg.dp.rpc import (
    RPC_METHODS,
    UTILITY_METHODS,
    RpcArgError,
    RpcContext,
    run_rpc,
    validate_rpc,
)


def test_unknown_method_and_bad_args_are_rejected() -> None:
    with pytest.raises(RpcArgError, match="unknown method 'rm_rf'"):
        validate_rpc("rm_rf", {}, RPC_METHODS)
    with pytest.raises(RpcArgError, match="unknown method 'kv_abort'"):
        validate_rpc("kv_abort", {"transfer_id": "x"}, RPC_METHODS)  # internal only
    with pytest.raises(RpcArgError, match="timeout_s must be a number"):
        validate_rpc("barrier", {"timeout_s": "soon"}, RPC_METHODS)
    with pytest.raises(RpcArgError, match="stagger_s"):
        validate_rpc("barrier", {"stagger_s": 99}, RPC_METHODS)
    with pytest.raises(RpcArgError, match="does not take"):
        validate_rpc("stats", {"x": 1}, RPC_METHODS)
    validate_rpc("barrier", {"timeout_s": 5, "stagger_s": 0.1}, RPC_METHODS)
    validate_rpc("kv_abort", {"transfer_id": "t"}, UTILITY_METHODS)


class _Group:
    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def barrier(self, timeout_s: float) -> float:
        self.timeouts.append(timeout_s)
        return 0.25


def test_barrier_uses_the_group_with_its_deadline() -> None:
    group = _Group()
    ctx = RpcContext(engine=None, group=group, rank=1, dp_state={"wave": 3})
    assert run_rpc(ctx, "barrier", {"timeout_s": 7}) == {"dp_rank": 1, "waited_s": 0.25}
    assert group.timeouts == [7.0]
    assert run_rpc(ctx, "dp_state", {}) == {"dp_rank": 1, "wave": 3}
    solo = RpcContext(engine=None, group=None, rank=0, dp_state={})
    assert run_rpc(solo, "barrier", {}) == {"dp_rank": 0, "waited_s": 0.0}


def test_a_barrier_never_outwaits_its_caller() -> None:
    """The ranks' barrier timeout is capped by the HTTP call's own: a rank still waiting in
    it after the 504 went out would serve nothing (and end at its own timeout)."""
    from disagg.server.admin import _rpc_body

    def args(body: str) -> dict[str, object]:
        return _rpc_body(body.encode())[1]

    assert args('{"method": "barrier", "timeout": 3}')["timeout_s"] == 3.0
    assert args('{"method": "barrier", "args": {"timeout_s": 20}, "timeout": 3}') \
        == {"timeout_s": 3.0}
    assert args('{"method": "barrier", "args": {"timeout_s": 2}, "timeout": 30}') \
        == {"timeout_s": 2.0}
    assert args('{"method": "stats", "timeout": 3}') == {}
