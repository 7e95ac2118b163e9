"""kv_connector_extra_config parsing of the P/D connector (pd_config) and the start-up hint."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from connectors.pd_config import FAULTS_ENV, parse_pd_config
from connectors.pd_metadata import slow_path_hint
from disagg.common.config import ConfigError
from disagg.common.kv_transfer_params import TransferMode


def parse_layerwise(extra: dict[str, Any], on_gpu: bool) -> bool:
    return parse_pd_config(extra, "kv_both", on_gpu).layerwise


@pytest.mark.parametrize(("extra", "on_gpu", "expected"), [
    ({}, True, True),                       # auto: streams where the forward is asynchronous
    ({}, False, False),
    ({"layerwise": "auto"}, True, True),
    ({"layerwise": True}, False, True),
    ({"layerwise": False}, True, False),
])
def test_layerwise_values(extra: dict[str, Any], on_gpu: bool, expected: bool) -> None:
    assert parse_layerwise(extra, on_gpu) is expected


@pytest.mark.parametrize("value", ["true", "on", 1, 0, None, "AUTO"])
def test_layerwise_bad_value_is_a_clear_error(value: Any) -> None:
    with pytest.raises(ConfigError, match='layerwise must be "auto", true or false'):
        parse_layerwise({"layerwise": value}, True)


@pytest.mark.parametrize(("value", "expected"), [("auto", 0), (1, 1), (4, 4)])
def test_layer_group_values(value: Any, expected: int) -> None:
    assert parse_pd_config({"layer_group": value}, "kv_both", True).layer_group == expected
    assert parse_pd_config({}, "kv_both", True).layer_group == 0


@pytest.mark.parametrize("value", [0, -2, 1.5, "4", True, None])
def test_layer_group_bad_value_is_a_clear_error(value: Any) -> None:
    with pytest.raises(ConfigError, match='layer_group must be "auto" or a whole number'):
        parse_pd_config({"layer_group": value}, "kv_both", True)


def test_early_start_is_a_flag_on_by_default() -> None:
    assert parse_pd_config({}, "kv_both", True).early_start is True
    assert parse_pd_config({"early_start": False}, "kv_both", True).early_start is False
    with pytest.raises(ConfigError, match="early_start must be true or false"):
        parse_pd_config({"early_start": "yes"}, "kv_both", True)


@pytest.mark.parametrize(("transport", "mode", "role", "on_gpu", "hinted"), [
    ("nixl", "read", "kv_consumer", True, True),
    ("nixl", "read", "kv_both", True, True),
    ("nixl", "read", "kv_producer", True, False),  # the producer is read from, it posts nothing
    ("nixl", "read", "kv_consumer", False, False),  # host memory: no cuda_ipc pulls
    ("nixl", "write", "kv_consumer", True, False),
    ("ipc", "read", "kv_consumer", True, False),
    ("tcp", "read", "kv_consumer", True, False),
])
def test_slow_path_hint_names_only_nixl_reads_between_gpus(transport: str, mode: str, role: str,
                                                            on_gpu: bool, hinted: bool) -> None:
    hint = slow_path_hint(transport, mode, role, on_gpu)
    assert (hint is not None) == hinted
    if hint is not None:
        assert "mode=write" in hint and "transport=ipc" in hint


def test_defaults_and_values_are_parsed_once() -> None:
    cfg = parse_pd_config({"mode": "write", "kv_load_failure_policy": "recompute",
                           "transfer_timeout": 2, "base_port": 7000, "verify_kv": True},
                          "kv_both", False)
    assert cfg.mode is TransferMode.WRITE and cfg.kv_load_failure_policy == "recompute"
    assert cfg.timeouts.transfer_timeout_s == 2.0 and cfg.timeouts.defer_timeout_s == 60.0
    assert cfg.base_port == 7000 and cfg.verify_kv and cfg.transport == "tcp"


@pytest.mark.parametrize(("extra", "match"), [
    ({"tranport": "tcp"}, r"unknown option\(s\) \['tranport'\]"),
    ({"transport": "rdma"}, "transport must be one of"),
    ({"mode": "push"}, "mode must be one of"),
    ({"kv_load_failure_policy": "retry"}, "kv_load_failure_policy must be one of"),
    ({"transfer_timeout": 0}, "transfer_timeout must be a positive number"),
    ({"lease_timeout": "5"}, "lease_timeout must be a positive number"),
    ({"defer_timeout": float("nan")}, "defer_timeout must be a positive number"),
    ({"base_port": 70000}, r"base_port must be an integer in \[0, 65535\]"),
    ({"host": ""}, "host must be"),
    ({"verify_kv": "yes"}, "verify_kv must be true or false"),
    ({"transport_options": []}, "transport_options must be an object"),
    ({"auth_key": "short"}, "auth_key must be"),
])
def test_bad_options_are_one_line_errors(extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_pd_config(extra, "kv_both", False)


def test_write_with_a_data_parallel_instance_is_refused() -> None:
    for role in ("kv_producer", "kv_consumer", "kv_both"):
        with pytest.raises(ConfigError, match="data-parallel instance"):
            parse_pd_config({"mode": "write"}, role, False, data_parallel_size=2)
    assert parse_pd_config({"mode": "write"}, "kv_consumer", False, 1).mode is TransferMode.WRITE
    assert parse_pd_config({"mode": "read"}, "kv_consumer", False, 2).mode is TransferMode.READ


def test_faults_are_refused_unless_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    faults = [{"at": "write_done", "action": "drop"}]
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    with pytest.raises(ConfigError, match=FAULTS_ENV):
        parse_pd_config({"faults": faults}, "kv_both", False)
    monkeypatch.setenv(FAULTS_ENV, "1")
    plan = parse_pd_config({"faults": faults}, "kv_both", False).faults
    assert plan is not None and plan.faults[0].at == "write_done"


@pytest.mark.parametrize(("faults", "match"), [
    ([{"at": "nowhere", "action": "drop"}], "unknown point"),
    ([{"at": "post", "action": "drop"}], "post takes"),
    ([{"at": "landed", "action": "flip", "nth": 0}], "nth and count start at 1"),
    ([{"at": "lease", "action": "drop", "bogus": 1}], "faults"),
    ({"at": "lease"}, "faults"),
])
def test_bad_fault_rules_are_refused(monkeypatch: pytest.MonkeyPatch, faults: Any,
                                     match: str) -> None:
    monkeypatch.setenv(FAULTS_ENV, "1")
    with pytest.raises(ConfigError, match=match):
        parse_pd_config({"faults": faults}, "kv_both", False)


@pytest.mark.parametrize(("extra", "words"), [
    ({"tranport": "tcp"}, "unknown option(s) ['tranport']"),
    ({"transport": "rdma"}, "transport must be one of"),
    ({"mode": "write"}, "WRITE mode with a data-parallel instance"),
])
def test_serve_refuses_a_bad_connector_config_before_loading_anything(
        capsys: pytest.CaptureFixture[str], extra: dict[str, Any], words: str) -> None:
    """`disagg serve` checks the connector's options while it parses its flags (exit 2, one
    line), not in the engine after the weights are loaded."""
    import json

    from disagg import cli

    kv = json.dumps({"kv_connector": "PDConnector", "kv_role": "kv_producer",
                     "kv_connector_extra_config": extra})
    assert cli.main(["serve", "--kv-transfer-config", kv, "-dp", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("disagg: error:") and words in err and err.count("\n") == 1, err
    assert cli.main(["serve", "--kv-transfer-config", json.dumps(
        {"kv_connector": "PDConect", "kv_role": "kv_producer"})]) == 2
    assert "unknown kv_connector 'PDConect'" in capsys.readouterr().err


@pytest.mark.parametrize(("host", "key", "warned"), [
    ("0.0.0.0", None, True), ("10.1.0.5", None, True), ("10.1.0.5", "a-long-key", False),
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False)])
def test_reachable_ports_without_an_auth_key_are_warned_about(
        caplog: pytest.LogCaptureFixture, host: str, key: str | None, warned: bool) -> None:
    extra: dict[str, object] = {"host": host, **({"auth_key": key} if key else {})}
    with caplog.at_level(logging.WARNING, logger="connectors.pd_config"):
        parse_pd_config(extra, "kv_producer", kv_cache_on_gpu=False)
    assert ("without kv_connector_extra_config.auth_key" in caplog.text) is warned
