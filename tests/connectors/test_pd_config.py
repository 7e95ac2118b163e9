"""kv_connector_extra_config parsing of the P/D connector."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.pd_metadata import parse_layerwise, slow_path_hint
from disagg.config import ConfigError


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
