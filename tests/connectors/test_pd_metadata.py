"""kv_connector_extra_config parsing of the P/D connector."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.pd_metadata import parse_layerwise
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
