"""Planning local instances for ``disagg-proxy --launch``: ports, devices, command lines."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from dataclasses import dataclass

from disagg.common import platform
from disagg.common.envs import KV_PARAMS_KEY_ENV
from proxy.config import TransferMode
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
    gpus_per_instance: int = 1
    instance_args: tuple[str, ...] = ()
    instance_command: tuple[str, ...] = DEFAULT_INSTANCE_COMMAND
    instance_base_port: int | None = None
    """HTTP port of the first instance (then +1 each); None: free ports are found."""
    kv_base_port: int | None = None
    """Connector base port of the first instance (then +16 each); None: found."""
    kv_params_key: str | None = None
    """Every instance's ``--kv-params-key``, passed in its environment (not visible in ps)."""


def kv_transfer_config(role: KVRole, transport: str, mode: TransferMode, base_port: int) -> str:
    """The ``--kv-transfer-config`` JSON of one instance."""
    return json.dumps({"kv_connector": "PDConnector", "kv_role": role.value,
                       "kv_connector_extra_config": {"transport": transport,
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


def device_groups(num_instances: int, gpus_per_instance: int) -> list[list[str]]:
    """Disjoint GPU ids per instance, taken from the visible devices in order."""

    inherited = os.environ.get(platform.visible_devices_env())
    if inherited:
        visible = [d.strip() for d in inherited.split(",") if d.strip()]
    else:
        visible = [str(i) for i in range(platform.current_platform().device_count)]
    needed = num_instances * gpus_per_instance
    if needed > len(visible):
        raise LaunchError(f"{num_instances} instances x {gpus_per_instance} GPU(s) need "
                          f"{needed} GPUs; {len(visible)} visible")
    return [visible[i * gpus_per_instance:(i + 1) * gpus_per_instance]
            for i in range(num_instances)]


def _dp_size(instance_args: tuple[str, ...]) -> int:
    """--data-parallel-size given to the instances (each rank takes KV_PORT_STRIDE ports)."""
    args = list(instance_args)
    for i, arg in enumerate(args):
        if arg.startswith("--data-parallel-size="):
            return max(1, int(arg.split("=", 1)[1]))
        if arg in ("--data-parallel-size", "-dp") and i + 1 < len(args):
            return max(1, int(args[i + 1]))
    return 1


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
    stride = KV_PORT_STRIDE * _dp_size(cfg.instance_args)
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
                  num_instances: int) -> dict[str, str]:
    env = {} if cfg.kv_params_key is None else {KV_PARAMS_KEY_ENV: cfg.kv_params_key}
    return {**env, **_device_env(gpus, num_instances)}


def _device_env(gpus: list[str] | None, num_instances: int) -> dict[str, str]:
    if gpus is not None:
        return {platform.visible_devices_env(): ",".join(gpus)}
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    # CPU instances share the cores; unbounded torch thread pools would fight each other.
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_instances))}


def plan_instances(cfg: LaunchConfig) -> list[InstanceSpec]:
    """One spec per local instance: prefill ones first, then decode ones."""
    roles = [KVRole.PRODUCER] * cfg.num_prefill + [KVRole.CONSUMER] * cfg.num_decode
    http_ports, kv_ports = _ports(cfg, len(roles))
    gpu_groups: list[list[str]] | None = None
    if cfg.device == "cuda":
        gpu_groups = device_groups(len(roles), cfg.gpus_per_instance)
    specs = []
    for i, role in enumerate(roles):
        index = i if role is KVRole.PRODUCER else i - cfg.num_prefill
        name = f"{'prefill' if role is KVRole.PRODUCER else 'decode'}-{index}"
        argv = (*cfg.instance_command, "serve", cfg.model, "--host", "127.0.0.1",
                "--port", str(http_ports[i]), "--device", cfg.device,
                "--kv-transfer-config",
                kv_transfer_config(role, cfg.transport, cfg.mode, kv_ports[i]),
                *cfg.instance_args)
        env = _instance_env(cfg, gpu_groups[i] if gpu_groups else None, len(roles))
        specs.append(InstanceSpec(name=name, role=role, port=http_ports[i], argv=argv, env=env))
    return specs
