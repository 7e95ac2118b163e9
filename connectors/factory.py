"""Builds the engine's connector from ``--kv-transfer-config``."""

from __future__ import annotations

from typing import Any

from connectors.base import KVConnector, register_connector, resolve_connector
from connectors.pd_connector import PDConnector
from disagg.config import ConfigError, KVTransferConfig

register_connector("PDConnector", PDConnector)


def create_connector(cfg: KVTransferConfig, engine: Any, kv_cache: Any) -> KVConnector:
    """Resolve the name (or import path) and construct the connector."""
    assert cfg.kv_connector is not None
    try:
        factory = resolve_connector(cfg.kv_connector)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return factory(cfg, engine, kv_cache)
