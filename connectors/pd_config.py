"""The P/D connector's options (``kv_connector_extra_config``), parsed once into a frozen object.

Every option is checked here, before the connector opens a socket or registers memory; a typo
(``"tranport"``) or a bad value is one readable ConfigError. The deadlines are defined here and
nowhere else (connectors/transfer.py says which state each one bounds).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

from connectors.faults import FaultPlan, parse_faults
from connectors.transfer import Timeouts
from disagg.common import envs
from disagg.common.config import ConfigError
from disagg.common.kv_transfer_params import TransferMode

logger = logging.getLogger(__name__)

TRANSPORTS = ("tcp", "nixl", "ipc", "mori", "fake")
FAULTS_ENV = envs.FAULT_INJECTION_ENV
"""Fault injection is refused unless this is 1 in the engine's environment (tests, drills)."""

_KNOWN = frozenset({
    "transport", "mode", "layerwise", "layer_group", "early_start", "transfer_timeout",
    "defer_timeout", "lease_timeout", "heartbeat_interval", "kv_load_failure_policy",
    "base_port", "host", "transport_options", "verify_kv", "faults", "auth_key"})


@dataclass(frozen=True, slots=True, kw_only=True)
class PDConnectorConfig:
    """Validated ``kv_connector_extra_config`` of the P/D connector."""

    transport: str = "tcp"
    """tcp | nixl | ipc | mori (fake: tests only)."""
    mode: TransferMode = TransferMode.READ
    """Default mode when a request's kv_transfer_params names none."""
    layerwise: bool = False
    """WRITE producer: post each layer's blocks as soon as the layer is computed."""
    layer_group: int = 0
    """Layerwise: post every this many layers, each post covering them (a block's layers are
    contiguous, so a post's rows are as many as one layer's); 0 ("auto"): 8 posts per step
    (ceil(num_layers / 8) layers each), one over ipc (see pd_stream.layer_group)."""
    early_start: bool = True
    """WRITE producer: start a prefill before the decode announced its blocks, within half
    the pool (PDConnector.can_schedule); false: wait for them."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    """transfer_timeout, defer_timeout, lease_timeout, heartbeat_interval (seconds)."""
    kv_load_failure_policy: str = "fail"
    """fail | recompute: what a consumer does when its KV cannot be loaded or vouched for."""
    base_port: int = 0
    """First control port (0: any free port); see protocol.kv_ports."""
    host: str = "127.0.0.1"
    """Address this engine's control plane binds and tells peers; must be reachable by them."""
    transport_options: dict[str, Any] = field(default_factory=dict)
    """Passed to the transport's options class."""
    verify_kv: bool = False
    """Compare a digest of every moved block on both sides before the KV is used."""
    faults: FaultPlan | None = None
    """Deterministic fault injection (refused unless DISAGG_FAULT_INJECTION=1)."""
    auth_key: str | None = None
    """Shared secret: handshakes must prove it (peers without it are refused)."""


def parse_pd_config(extra: dict[str, Any], kv_role: str, kv_cache_on_gpu: bool,
                    data_parallel_size: int = 1, tensor_parallel_size: int = 1
                    ) -> PDConnectorConfig:
    """Check every option of ``kv_connector_extra_config``; ConfigError names the first bad one."""
    unknown = sorted(set(extra) - _KNOWN)
    if unknown:
        raise ConfigError(f"kv_connector_extra_config: unknown option(s) {unknown}; known: "
                          f"{sorted(_KNOWN)}")
    transport = _choice(extra, "transport", "tcp", TRANSPORTS)
    mode = TransferMode(_choice(extra, "mode", "read", ("read", "write")))
    policy = _choice(extra, "kv_load_failure_policy", "fail", ("fail", "recompute"))
    if mode is TransferMode.WRITE and data_parallel_size > 1:
        # The peers name one engine (rank 0's id in instance_info), but the instance's
        # frontend may place the request on any rank: the transfer would wait for a peer that
        # never comes and expire. Refused until the proxy can pin a request to a rank.
        raise ConfigError("WRITE mode with a data-parallel instance (prefill or decode) is not "
                          "supported yet; use mode=read or one rank per instance")
    options = extra.get("transport_options", {})
    if not isinstance(options, dict):
        raise ConfigError("kv_connector_extra_config.transport_options must be an object")
    faults = parse_faults(extra.get("faults"))
    if faults is not None and not faults_enabled():
        raise ConfigError(f"kv_connector_extra_config.faults is refused unless {FAULTS_ENV}=1 "
                          "is set for the engine (fault injection is for tests and drills)")
    if faults is None and faults_enabled():
        faults = FaultPlan([])  # rules may be set while running (EngineCore.kv_faults)
    auth_key = extra.get("auth_key")
    if auth_key is not None and (not isinstance(auth_key, str) or len(auth_key) < 8):
        raise ConfigError("kv_connector_extra_config.auth_key must be a string of 8+ characters")
    host = _host(extra)
    if auth_key is None and not _loopback(host):
        logger.warning(
            "the KV connector listens on %s without kv_connector_extra_config.auth_key: anyone "
            "who can reach its ports can handshake, learn the transport's descriptor and read "
            "the KV cache (prompts); set the same auth_key on every instance of the deployment",
            host)
    return PDConnectorConfig(
        transport=transport, mode=mode,
        layerwise=_layerwise(extra, kv_cache_on_gpu, tensor_parallel_size),
        layer_group=_layer_group(extra),
        early_start=_bool(extra, "early_start", True),
        timeouts=parse_timeouts(extra), kv_load_failure_policy=policy,
        base_port=_int(extra, "base_port", 0, 0, 65535), host=host,
        transport_options=dict(options), verify_kv=_bool(extra, "verify_kv", False),
        faults=faults, auth_key=auth_key)


def _loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def faults_enabled() -> bool:
    """Whether this process may inject faults (DISAGG_FAULT_INJECTION=1)."""
    return envs.fault_injection()


def _choice(extra: dict[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = extra.get(key, default)
    if value not in allowed:
        raise ConfigError(f"kv_connector_extra_config.{key} must be one of {list(allowed)}, "
                          f"got {value!r}")
    return str(value)


def _bool(extra: dict[str, Any], key: str, default: bool) -> bool:
    value = extra.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"kv_connector_extra_config.{key} must be true or false, got {value!r}")
    return value


def _int(extra: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"kv_connector_extra_config.{key} must be an integer in [{lo}, {hi}], "
                          f"got {value!r}")
    return value


def _host(extra: dict[str, Any]) -> str:
    value = extra.get("host", "127.0.0.1")
    if not isinstance(value, str) or not value or len(value) > 255:
        raise ConfigError(f"kv_connector_extra_config.host must be a host name or address, "
                          f"got {value!r}")
    return value


def parse_timeouts(extra: dict[str, Any]) -> Timeouts:
    """The deadlines of kv_connector_extra_config, validated (finite positive numbers)."""
    values = {}
    for key, default in (("transfer_timeout", 30.0), ("defer_timeout", 60.0),
                         ("lease_timeout", 5.0), ("heartbeat_interval", 1.0)):
        value = extra.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 < value < 1e6:
            raise ConfigError(f"kv_connector_extra_config.{key} must be a positive number of "
                              f"seconds, got {value!r}")
        values[key] = float(value)
    return Timeouts(transfer_timeout_s=values["transfer_timeout"],
                    defer_timeout_s=values["defer_timeout"],
                    lease_timeout_s=values["lease_timeout"],
                    heartbeat_interval_s=values["heartbeat_interval"])


def _layer_group(extra: dict[str, Any]) -> int:
    """"auto" (0, the default) or a whole number of layers >= 1."""
    value = extra.get("layer_group", "auto")
    if value == "auto":
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(f'kv_connector_extra_config.layer_group must be "auto" or a whole number '
                      f">= 1, got {value!r}")


def _layerwise(extra: dict[str, Any], kv_cache_on_gpu: bool, tp_size: int = 1) -> bool:
    """"auto" (default: on when the KV cache is on a GPU, where the forward is asynchronous and
    streaming overlaps it, and the engine has one TP rank), true or false. It applies to WRITE
    transfers this engine produces. Streaming layers from several TP ranks is not built yet:
    the per-layer posts run inside rank 0's forward only."""
    value = extra.get("layerwise", "auto")
    if value == "auto":
        return kv_cache_on_gpu and tp_size == 1
    if value is True and tp_size > 1:
        raise ConfigError("kv_connector_extra_config.layerwise=true is not supported with "
                          "--tensor-parallel-size > 1 yet; leave it \"auto\" or false")
    if isinstance(value, bool):
        return value
    raise ConfigError(f'kv_connector_extra_config.layerwise must be "auto", true or false, '
                      f"got {value!r}")
