"""Planning local instances for ``disagg-proxy --launch``: ports, devices, command lines."""

from __future__ import annotations

import json
import random
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from disagg.common import platform
from disagg.common.envs import KV_PARAMS_KEY_ENV, REGISTRATION_KEY_ENV
from proxy.config import TransferMode
from proxy.placement import RoleShape, cpu_threads_env, instance_dp_size, place, role_shape
from proxy.registration import KVRole
from proxy.supervisor import InstanceSpec, LaunchError

DEFAULT_MODEL = "builtin:tiny-llama"
"""What ``--launch`` serves when no model is given (on CPU)."""
DEFAULT_INSTANCE_COMMAND = (sys.executable, "-m", "disagg.cli")
KV_PORT_STRIDE = 16
"""Ports reserved above each instance's connector base port (DP and TP ranks, notify)."""
# Below Linux's ephemeral range (32768+), so an outgoing connection cannot take a port
# between our check that it is free and the instance binding it.
_PORT_RANGE = (20000, 32000)


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchConfig:
    """What to launch locally."""

    num_prefill: int
    num_decode: int
    model: str
    transport: str
    mode: TransferMode
    device: str
    """``cpu`` or ``cuda`` (a torch GPU: ROCm or CUDA)."""
    tp_prefill: int = 1
    """``--tensor-parallel-size`` of every prefill instance."""
    tp_decode: int = 1
    """``--tensor-parallel-size`` of every decode instance."""
    gpus_per_instance: int | None = None
    """GPUs each instance gets on ``cuda``; None: its DP size x its role's TP size."""
    instance_args: tuple[str, ...] = ()
    instance_command: tuple[str, ...] = DEFAULT_INSTANCE_COMMAND
    instance_base_port: int | None = None
    """HTTP port of the first instance (then +1 each); None: free ports are found."""
    kv_base_port: int | None = None
    """Connector base port of the first instance (then +16 each); None: found."""
    kv_params_key: str | None = None
    """Every instance's ``--kv-params-key``, passed in its environment (not visible in ps)."""
    registration_key: str | None = None
    """Every instance's ``--registration-key``, passed in its environment."""
    kv_connector_extra_config: Mapping[str, Any] = field(default_factory=dict)
    """More connector options for every instance (``--kv-connector-extra-config``)."""


def kv_transfer_config(role: KVRole, transport: str, mode: TransferMode, base_port: int,
                       extra: Mapping[str, Any] | None = None) -> str:
    """The ``--kv-transfer-config`` JSON of one instance (``extra``: more connector options;
    the instance checks them before it loads anything)."""
    return json.dumps({"kv_connector": "PDConnector", "kv_role": role.value,
                       "kv_connector_extra_config": {**(extra or {}), "transport": transport,
                                                     "mode": mode.value,
                                                     "base_port": base_port}})


def _bind_all(ports: list[int]) -> list[socket.socket] | None:
    """Bind every port on 127.0.0.1 (held open), or None if one is taken."""
    held: list[socket.socket] = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            for other in held:
                other.close()
            return None
        held.append(sock)
    return held


def find_port_blocks(num_blocks: int, block_size: int, rng: random.Random | None = None,
                     max_tries: int = 200) -> list[int]:
    """Base ports of ``num_blocks`` disjoint runs of ``block_size`` free ports."""
    rng = rng or random.Random()
    held: list[socket.socket] = []
    bases: list[int] = []
    try:
        for _ in range(max_tries):
            if len(bases) == num_blocks:
                break
            base = rng.randrange(_PORT_RANGE[0], _PORT_RANGE[1] - block_size)
            got = _bind_all(list(range(base, base + block_size)))
            if got is not None:
                held += got
                bases.append(base)
    finally:
        for sock in held:
            sock.close()
    if len(bases) < num_blocks:
        raise LaunchError(f"could not find {num_blocks} free runs of {block_size} ports")
    return bases


def check_ports_free(ports: list[int]) -> None:
    """Raise LaunchError naming the first port that is already in use."""
    for port in ports:
        held = _bind_all([port])
        if held is None:
            raise LaunchError(f"port {port} is already in use")
        held[0].close()


def resolve_device(requested: str, model_given: bool) -> str:
    """``auto``: the built-in demo model runs on CPU, a real model on a GPU when there is one."""
    if requested == "cpu" or (requested == "auto" and not model_given):
        return "cpu"

    if platform.is_gpu():
        return "cuda"
    if requested == "cuda":
        raise LaunchError("--device cuda was given but torch sees no GPU")
    return "cpu"


def role_shapes(cfg: LaunchConfig) -> list[RoleShape]:
    """Prefill's shape, then decode's (DP size from the instance arguments)."""
    dp = instance_dp_size(cfg.instance_args)
    gpus = cfg.gpus_per_instance if cfg.device == "cuda" else None  # CPU: nothing to place
    return [role_shape("prefill", cfg.num_prefill, dp, cfg.tp_prefill, gpus),
            role_shape("decode", cfg.num_decode, dp, cfg.tp_decode, gpus)]


def _ports(cfg: LaunchConfig, num_instances: int) -> tuple[list[int], list[int]]:
    """HTTP ports and connector base ports; searched ports that collide are searched again
    (each search releases its probe sockets, so two searches can pick overlapping ports)."""
    for _ in range(9):
        try:
            return _ports_once(cfg, num_instances)
        except LaunchError:
            if cfg.instance_base_port is not None and cfg.kv_base_port is not None:
                raise
    return _ports_once(cfg, num_instances)


def _ports_once(cfg: LaunchConfig, num_instances: int) -> tuple[list[int], list[int]]:
    """One try at HTTP ports and connector base ports (a stride per DP rank)."""
    stride = KV_PORT_STRIDE * instance_dp_size(cfg.instance_args)
    if cfg.instance_base_port is not None:
        http_ports = [cfg.instance_base_port + i for i in range(num_instances)]
        check_ports_free(http_ports)
    else:
        http_ports = find_port_blocks(num_instances, 1)
    if cfg.kv_base_port is not None:
        kv_ports = [cfg.kv_base_port + i * stride for i in range(num_instances)]
        check_ports_free(kv_ports)
    else:
        kv_ports = find_port_blocks(num_instances, stride)
    if set(http_ports) & {p + k for p in kv_ports for k in range(stride)}:
        raise LaunchError("instance HTTP ports overlap connector ports; change a base port")
    return http_ports, kv_ports


def _instance_env(cfg: LaunchConfig, gpus: list[str] | None,
                  shapes: list[RoleShape]) -> dict[str, str]:
    env = {} if cfg.kv_params_key is None else {KV_PARAMS_KEY_ENV: cfg.kv_params_key}
    if cfg.registration_key is not None:
        env[REGISTRATION_KEY_ENV] = cfg.registration_key
    if gpus is not None:
        return {**env, platform.visible_devices_env(): ",".join(gpus)}
    return {**env, **cpu_threads_env(shapes)}


PEER_COPY_TRANSPORTS = frozenset({"ipc", "mori"})
"""Transports that copy GPU memory between processes of one host: each process must see its
peers' GPUs too (they are found by UUID), not only its own."""


def _visible_gpus(cfg: LaunchConfig, groups: list[list[str]] | None, i: int) -> list[str] | None:
    """Instance ``i``'s GPUs, first (it computes on those: device 0 upward); with a peer-copy
    transport, every other launched instance's GPUs after them."""
    if groups is None:
        return None
    own = groups[i]
    if cfg.transport not in PEER_COPY_TRANSPORTS:
        return own
    return [*own, *(g for group in groups for g in group if g not in own)]


def plan_instances(cfg: LaunchConfig) -> list[InstanceSpec]:
    """One spec per local instance: prefill ones first, then decode ones. On ``cuda`` each gets
    its own GPUs (checked first: too few visible is a LaunchError before any port search)."""
    roles = [KVRole.PRODUCER] * cfg.num_prefill + [KVRole.CONSUMER] * cfg.num_decode
    shapes = role_shapes(cfg)
    gpu_groups = place(shapes) if cfg.device == "cuda" else None
    http_ports, kv_ports = _ports(cfg, len(roles))
    specs = []
    for i, role in enumerate(roles):
        prefill = role is KVRole.PRODUCER
        name = f"prefill-{i}" if prefill else f"decode-{i - cfg.num_prefill}"
        argv = (*cfg.instance_command, "serve", cfg.model, "--host", "127.0.0.1",
                "--port", str(http_ports[i]), "--device", cfg.device,
                "--tensor-parallel-size", str(cfg.tp_prefill if prefill else cfg.tp_decode),
                "--kv-transfer-config",
                kv_transfer_config(role, cfg.transport, cfg.mode, kv_ports[i],
                                   cfg.kv_connector_extra_config),
                *cfg.instance_args)
        env = _instance_env(cfg, _visible_gpus(cfg, gpu_groups, i), shapes)
        specs.append(InstanceSpec(name=name, role=role, port=http_ports[i], argv=argv, env=env))
    return specs
