"""``disagg-proxy``: run the proxy, or with ``--launch`` a whole local P/D deployment.

    disagg-proxy --prefill http://h:8100 --decode http://h:8200          # proxy only
    disagg-proxy --launch                                                # 1P1D tiny model, CPU
    disagg-proxy --launch --num-prefill 2 --num-decode 2 --model M -- --max-num-seqs 64
    disagg-proxy --launch --model M --tp-prefill 4 --tp-decode 2 --num-decode 2   # 8 GPUs

Arguments after ``--`` (or each ``--instance-arg=ARG``) are passed to every instance. On GPUs
each instance gets its own contiguous GPUs (dp x tp of them; proxy/placement.py).
Prints ``disagg-proxy: ready on http://HOST:PORT`` once it serves; Ctrl-C / SIGTERM stops
everything (exit 0); an instance that dies stops everything too (exit 1, one line saying why).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import secrets
import shlex
import signal
import socket
import sys
from dataclasses import replace
from typing import Any

from aiohttp import web

from disagg.common import envs
from disagg.common.config import (
    ConfigError,
    checked,
    non_negative_int,
    port_number,
    positive_float,
    positive_int,
)
from disagg.common.help_formatter import DefaultsHelpFormatter, OneLineErrorParser
from disagg.common.logging_setup import add_logging_args, configure_logging, export_to_children
from disagg.common.registration import check_key, zmq_address
from proxy.app import bound_url, start_site
from proxy.app import make_app as make_proxy_app
from proxy.config import PolicyName, ProxyConfig, TransferMode
from proxy.local_instances import (
    DEFAULT_INSTANCE_COMMAND,
    DEFAULT_MODEL,
    LaunchConfig,
    plan_instances,
    resolve_device,
)
from proxy.placement import MAX_TP_SIZE, TP_FLAGS, instance_dp_size, instance_flag
from proxy.registration import KVRole, RegistrationBindError
from proxy.registry import Pool, normalize_url
from proxy.state import STATE_KEY
from proxy.supervisor import LaunchError, Supervisor

logger = logging.getLogger("disagg-proxy")
PROG = "disagg-proxy"
POOL_READY_TIMEOUT_S = 30.0


def _threshold(value: str) -> int | str:
    """``--local-prefill-threshold``: a token count or ``auto``."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count or 'auto', got {value!r}")\
            from None


instance_url = checked(normalize_url)
"""argparse type of --prefill / --decode: http(s)://HOST:PORT (or HOST:PORT)."""


def _bind_address(value: str) -> str:
    """A ZMQ address to bind (its port may be *)."""
    return zmq_address(value, bind=True)


def _add_proxy_args(parser: argparse.ArgumentParser) -> None:
    d = ProxyConfig()
    add = parser.add_argument
    add("--host", default=d.host, help="address to listen on (default %(default)s)")
    add("--port", type=port_number, default=d.port, help="HTTP port (default %(default)s)")
    add("--prefill", nargs="+", action="extend", default=[], metavar="URL", type=instance_url,
        help="static prefill instance(s) (default: none)")
    add("--decode", nargs="+", action="extend", default=[], metavar="URL", type=instance_url,
        help="static decode instance(s) (default: none)")
    add("--mode", choices=[m.value for m in TransferMode], default=d.mode.value,
        help="KV transfer mode (default %(default)s)")
    add("--policy", choices=[p.value for p in PolicyName], default=PolicyName.LEAST_LOADED.value,
        help="routing policy (default %(default)s); kv_aware: the instance whose prefix cache "
             "holds most of the prompt, minus a load penalty; only instances registered with "
             "--proxy-address publish their caches (--launch registers its own), static "
             "--prefill/--decode ones are routed as least_loaded")
    add("--model", default=None,
        help="model to launch / whose tokenizer counts prompt tokens (default: the instances' "
             f"model; {DEFAULT_MODEL} with --launch)")
    add("--local-prefill-threshold", type=_threshold, default=0, metavar="TOKENS|auto",
        help="prompts shorter than this go to a decode instance alone (0: never); auto: "
             "learned from the phase timings, rising when the prefill pool is busy "
             "(proxy/local_prefill.py; the value in use is on /metrics) (default %(default)s)")
    add("--local-prefill-max-tokens", type=int, default=d.local_prefill_max_tokens,
        metavar="TOKENS", help="with --local-prefill-threshold auto: the largest prompt a "
                               "decode prefills alone (default %(default)s)")
    add("--first-token", choices=("prefill", "recompute"), default="prefill",
        help="prefill: the decode streams the token the prefill already sampled at once and "
             "computes on from it; recompute: the decode computes the first token again "
             "(default %(default)s; both give the monolithic output)")
    add("--registration-address", default=None, metavar="tcp://HOST:PORT",
        type=checked(_bind_address),
        help="ZMQ address where instances started with --proxy-address register (default: "
             "none, no registration)")
    add("--registration-key", default=None, type=checked(check_key),
        help="shared secret: only registrations sealed with it count (instances give the same "
             "--registration-key; default: env DISAGG_REGISTRATION_KEY, else none needed; "
             "--launch without --registration-address makes a random one for its instances)")
    add("--max-missed-heartbeats", type=positive_int, default=d.max_missed_heartbeats,
        help="heartbeat intervals a registered instance may miss before it leaves the pool")
    add("--kv-index-max-hashes", type=positive_int, default=d.kv_index_max_hashes,
        help="block hashes the kv_aware index keeps over all instances (default %(default)s)")
    add("--admin-key", default=None,
        help="Bearer key enabling the /admin API (default: none, the admin API is off)")
    add("--api-key", default=None,
        help="clients' /v1/* requests must send 'Authorization: Bearer KEY'; also sent to the "
             "instances, which need not have one (default: env DISAGG_API_KEY or VLLM_API_KEY, "
             "else open)")
    add("--kv-params-key", default=None,
        help="secret sent to instances in header X-Disagg-KV-Key (their --kv-params-key; "
             "default: env DISAGG_KV_PARAMS_KEY, else none; --launch makes a random one)")
    add("--health-check-interval-s", type=positive_float, default=d.health_check_interval_s,
        help="seconds between two probes of every instance's /instance_info")
    add("--unhealthy-after-failures", type=positive_int, default=d.unhealthy_after_failures,
        help="failed or slow probes in a row before an instance leaves the rotation "
             "(one is enough right after a request failed on it)")
    for name, what in _TIMEOUTS.items():
        add(f"--{name.replace('_', '-')}-timeout-s", type=positive_float,
            default=getattr(d, f"{name}_timeout_s"), help=f"deadline in seconds {what}")
    add("--max-prefill-attempts", type=positive_int, default=d.max_prefill_attempts,
        help="prefill instances tried before a request fails (before the client got a byte)")
    add("--max-decode-attempts", type=positive_int, default=d.max_decode_attempts,
        help="decode instances tried before a request fails (before the client got a byte)")
    add("--access-log", action="store_true", help="log one line per request")
    add("--log-request-phases-sample-rate", type=float, default=0.0, metavar="FRACTION",
        help="log one line with the id and TTFT phases of this fraction (0-1) of requests "
             "(default %(default)s: none)")
    add_logging_args(parser)


_TIMEOUTS = {"connect": "to open a connection to an instance",
             "prefill": "of a whole prefill call",
             "first_byte": "from sending a streamed decode request to its first bytes (a "
                           "non-streamed answer's first byte is its last: "
                           "--request-timeout-s bounds it)",
             "stream_idle": "of silence between two chunks of a decode stream",
             "request": "of a whole decode call, stream included"}
"""The --*-timeout-s flags (ProxyConfig's fields of the same names)."""


def _add_launch_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("local instances (--launch)")
    add = group.add_argument
    add("--launch", action="store_true", help="start local instances as subprocesses")
    add("--num-prefill", type=int, default=1, help="prefill instances to start")
    add("--num-decode", type=int, default=1, help="decode instances to start")
    add("--transport", choices=["tcp", "nixl", "ipc", "mori"], default="tcp",
        help="how the instances move KV blocks")
    add("--kv-connector-extra-config", default=None, metavar="JSON",
        help="connector options merged into every instance's kv_connector_extra_config "
             "(e.g. '{\"transfer_timeout\": 30, \"verify_kv\": true}'); transport, mode and "
             "base_port come from --transport, --mode and --kv-base-port (default: none)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="auto: CPU for the built-in model, GPUs (dp x tp per instance) for a real one "
             "(default %(default)s)")
    add("--tp-prefill", type=int, default=1, metavar="N",
        help="--tensor-parallel-size of each prefill instance (default %(default)s)")
    add("--tp-decode", type=int, default=1, metavar="N",
        help="--tensor-parallel-size of each decode instance (default %(default)s)")
    add("--gpus-per-instance", type=int, default=None,
        help="GPUs per instance on a GPU (default: its dp x tp)")
    add("--instance-arg", action="append", default=[], metavar="ARG",
        help="one argument for every instance (use --instance-arg=--flag for dashes; "
             "default: none)")
    add("--instance-base-port", type=port_number, default=None,
        help="first instance HTTP port, then +1 each (default: free ports are found)")
    add("--kv-base-port", type=port_number, default=None,
        help="first instance connector base port, then +16 each (default: free ports are "
             "found)")
    add("--ready-timeout-s", type=positive_float, default=600.0,
        help="seconds every instance gets to load and report ready")
    add("--stop-timeout-s", type=positive_float, default=15.0,
        help="seconds an instance gets to stop after SIGTERM, before SIGKILL")
    add("--on-instance-exit", choices=["shutdown", "restart"], default="shutdown",
        help="what an instance's death does: stop everything, or restart it")
    add("--max-restarts", type=non_negative_int, default=3,
        help="restarts per instance with --on-instance-exit restart")
    add("--instance-command", default=None, help=argparse.SUPPRESS)  # tests: a fake instance


def build_parser() -> argparse.ArgumentParser:
    """The ``disagg-proxy`` argument parser."""
    parser = OneLineErrorParser(prog=PROG, description="disagg P/D proxy and launcher",
                                     formatter_class=DefaultsHelpFormatter)
    _add_proxy_args(parser)
    _add_launch_args(parser)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and validate; ``args.instance_args`` holds everything for the instances."""
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = build_parser()
    args = parser.parse_args(own)
    args.instance_args = [*args.instance_arg, *extra]
    if not args.launch and not (args.prefill or args.decode or args.registration_address):
        parser.error("give --prefill/--decode URLs, --registration-address, or --launch")
    if args.launch and (args.num_prefill < 1 or args.num_decode < 1):
        parser.error("--num-prefill and --num-decode must be at least 1")
    if extra and not args.launch:
        parser.error("arguments after '--' are for --launch instances")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a TCP port")
    if (args.local_prefill_threshold != "auto" and args.local_prefill_threshold < 0) \
            or args.local_prefill_max_tokens < 0 or (args.gpus_per_instance or 1) < 1:
        parser.error("--local-prefill-threshold and --local-prefill-max-tokens must be >= 0 "
                     "and --gpus-per-instance >= 1")
    if not 0 <= args.log_request_phases_sample_rate <= 1:
        parser.error("--log-request-phases-sample-rate must be between 0 and 1")
    _check_parallel_args(parser, args)
    args.kv_extra = _kv_extra(parser, args)
    try:
        args.registration_key = args.registration_key or check_key(envs.registration_key())
    except ValueError as exc:
        parser.error(f"{envs.REGISTRATION_KEY_ENV}: {exc}")
    if args.registration_key is None and args.launch and not args.registration_address:
        # only the launched instances register (kv_aware): a key they alone know. With a
        # --registration-address given, outside instances may register too: the user's key
        args.registration_key = secrets.token_hex(16)
    return args


_LAUNCHER_OWNS = {"transport": "--transport", "mode": "--mode", "base_port": "--kv-base-port"}
"""kv_connector_extra_config keys the launcher writes from its own flags."""


def _kv_extra(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """``--kv-connector-extra-config`` as a dict; the launcher's own keys and a user
    ``--kv-transfer-config`` among the instance arguments are refused (the latter used to turn
    the instances into kv_both on random ports, silently)."""
    if instance_flag(args.instance_args, ("--kv-transfer-config",)) is not None:
        parser.error("the launcher writes each instance's --kv-transfer-config (role, "
                     "transport, mode, ports); pass connector options with "
                     "--kv-connector-extra-config JSON instead")
    if args.kv_connector_extra_config is None:
        return {}
    if not args.launch:
        parser.error("--kv-connector-extra-config is for --launch instances")
    try:
        extra = json.loads(args.kv_connector_extra_config)
    except json.JSONDecodeError as exc:
        parser.error(f"--kv-connector-extra-config is not valid JSON: {exc}")
    if not isinstance(extra, dict):
        parser.error("--kv-connector-extra-config must be a JSON object")
    owned = sorted(set(extra) & set(_LAUNCHER_OWNS))
    if owned:
        parser.error(f"--kv-connector-extra-config: give {owned[0]!r} as "
                     f"{_LAUNCHER_OWNS[owned[0]]}, not in the JSON")
    return extra


def _check_parallel_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """TP sizes in range, given once (ours, not the instance arguments'), and a usable DP."""
    for flag in ("--tp-prefill", "--tp-decode"):
        size = getattr(args, flag[2:].replace("-", "_"))
        if not 1 <= size <= MAX_TP_SIZE:
            parser.error(f"{flag} must be between 1 and {MAX_TP_SIZE}, got {size}")
    if instance_flag(args.instance_args, TP_FLAGS) is not None:
        parser.error("give the instances' tensor-parallel size as --tp-prefill/--tp-decode, "
                     "not as an instance argument")
    try:
        instance_dp_size(args.instance_args)
    except ValueError as exc:
        parser.error(f"instance argument --data-parallel-size: {exc}")


def kv_params_key(args: argparse.Namespace) -> str | None:
    """The flag, else the environment, else (for --launch, whose instances get it) a new one."""
    key: str | None = args.kv_params_key or envs.kv_params_key()
    if key is None and args.launch:
        key = secrets.token_hex(16)
    return key


def proxy_config(args: argparse.Namespace) -> ProxyConfig:
    """The ProxyConfig the arguments describe (static URLs only; launched ones added later)."""
    return ProxyConfig(
        host=args.host, port=args.port, prefill_urls=tuple(args.prefill),
        decode_urls=tuple(args.decode), mode=TransferMode(args.mode),
        policy=PolicyName(args.policy), model=args.model or (DEFAULT_MODEL if args.launch
                                                             else None),
        local_prefill_threshold_tokens=0 if args.local_prefill_threshold == "auto"
        else args.local_prefill_threshold,
        local_prefill_auto=args.local_prefill_threshold == "auto",
        local_prefill_max_tokens=args.local_prefill_max_tokens,
        first_token_from_prefill=args.first_token == "prefill",
        registration_address=args.registration_address,
        registration_key=args.registration_key,
        max_missed_heartbeats=args.max_missed_heartbeats,
        kv_index_max_hashes=args.kv_index_max_hashes, admin_key=args.admin_key,
        api_key=args.api_key or envs.api_key(),
        kv_params_key=kv_params_key(args),
        health_check_interval_s=args.health_check_interval_s,
        unhealthy_after_failures=args.unhealthy_after_failures,
        connect_timeout_s=args.connect_timeout_s, prefill_timeout_s=args.prefill_timeout_s,
        first_byte_timeout_s=args.first_byte_timeout_s,
        stream_idle_timeout_s=args.stream_idle_timeout_s,
        request_timeout_s=args.request_timeout_s,
        max_prefill_attempts=args.max_prefill_attempts,
        max_decode_attempts=args.max_decode_attempts, access_log=args.access_log,
        log_request_phases_sample_rate=args.log_request_phases_sample_rate,
        log_stats_interval_s=None if args.disable_log_stats else envs.log_stats_interval_s())


def launch_config(args: argparse.Namespace, kv_params_key: str | None = None,
                  registration_key: str | None = None) -> LaunchConfig:
    """The LaunchConfig the arguments describe (resolves ``--device auto``); the instances
    get ``kv_params_key`` and ``registration_key`` (the proxy's own)."""
    command = tuple(shlex.split(args.instance_command)) if args.instance_command \
        else DEFAULT_INSTANCE_COMMAND
    return LaunchConfig(
        num_prefill=args.num_prefill, num_decode=args.num_decode,
        model=args.model or DEFAULT_MODEL, transport=args.transport,
        mode=TransferMode(args.mode), device=resolve_device(args.device, args.model is not None),
        tp_prefill=args.tp_prefill, tp_decode=args.tp_decode,
        gpus_per_instance=args.gpus_per_instance, instance_args=tuple(args.instance_args),
        kv_connector_extra_config=getattr(args, "kv_extra", {}),
        instance_command=command, instance_base_port=args.instance_base_port,
        kv_base_port=args.kv_base_port, kv_params_key=kv_params_key,
        registration_key=registration_key)


def _stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _start_proxy(cfg: ProxyConfig) -> web.AppRunner:
    try:
        runner = await start_site(make_proxy_app(cfg), cfg.host, cfg.port, cfg.access_log)
    except RegistrationBindError as exc:
        raise LaunchError(str(exc)) from None
    except OSError as exc:
        raise LaunchError(f"cannot serve on {cfg.host}:{cfg.port}: {exc}") from None
    for line in startup_lines(cfg, bound_url(runner)):
        logger.info("%s", line)
    return runner


def _registration_line(cfg: ProxyConfig) -> str:
    if not cfg.registration_address:
        return "off"
    if cfg.registration_key is not None:
        return f"{cfg.registration_address} (sealed)"
    if not cfg.registration_address.startswith(("tcp://127.", "tcp://localhost:", "ipc://")):
        logger.warning("registrations on %s are not sealed: anyone who can reach it can add "
                       "an instance to the pools or change one's info; give the proxy and its "
                       "instances the same --registration-key", cfg.registration_address)
    return f"{cfg.registration_address} (unsealed)"


def startup_lines(cfg: ProxyConfig, url: str) -> list[str]:
    """What an operator checks first: mode, pools, ports, then the deadlines and retries."""
    return [f"proxy on {url}: mode={cfg.mode.value}, policy={cfg.policy.value}, "
            f"prefill=[{', '.join(cfg.prefill_urls)}], decode=[{', '.join(cfg.decode_urls)}], "
            f"registration={_registration_line(cfg)}, "
            f"local_prefill_threshold={cfg.local_prefill_threshold_tokens} tokens",
            "deadlines: " + ", ".join(f"{name}={getattr(cfg, f'{name}_timeout_s'):g} s"
                                      for name in _TIMEOUTS)
            + f"; attempts: prefill {cfg.max_prefill_attempts}, decode "
              f"{cfg.max_decode_attempts}; health checks every {cfg.health_check_interval_s:g} s"]


def _announce(runner: web.AppRunner) -> None:
    print(f"{PROG}: ready on {bound_url(runner)}", flush=True)


async def _run_proxy_only(cfg: ProxyConfig) -> int:
    stop = _stop_event()
    runner = await _start_proxy(cfg)
    try:
        _announce(runner)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


async def _wait_pools(app: web.Application, num_prefill: int, num_decode: int,
                      timeout_s: float) -> None:
    """Until the proxy sees every launched instance healthy (its probes run every interval)."""
    registry = app[STATE_KEY].registry
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (len(registry.healthy(Pool.PREFILL)) < num_prefill
           or len(registry.healthy(Pool.DECODE)) < num_decode):
        if loop.time() > deadline:
            problems = [f"{i.url}: {i.state.value} {i.last_error or ''}".strip()
                        for i in registry.instances() if i.last_error]
            raise LaunchError("the proxy does not see every instance healthy: "
                              + "; ".join(problems))
        await asyncio.sleep(0.1)


async def _supervise(sup: Supervisor, stop: asyncio.Event, restart: bool,
                     max_restarts: int) -> int:
    """Until a signal (0) or a child's death that is not restarted (1)."""
    stop_wait = asyncio.ensure_future(stop.wait())
    try:
        while True:
            death = asyncio.ensure_future(sup.wait_any_exit())
            await asyncio.wait({stop_wait, death}, return_when=asyncio.FIRST_COMPLETED)
            if stop_wait.done():
                death.cancel()
                logger.info("stopping: signal received")
                return 0
            child = death.result()
            if restart and child.restarts < max_restarts:
                print(f"{PROG}: {child.describe_exit()}; restarting it", file=sys.stderr,
                      flush=True)
                await asyncio.sleep(1.0)
                await sup.respawn(child)
                continue
            print(f"{PROG}: {child.describe_exit()}; shutting down", file=sys.stderr, flush=True)
            return 1
    finally:
        stop_wait.cancel()


def _ephemeral_port() -> int:
    """A free port from the kernel's ephemeral range (instance ports are searched below it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_kv_registration(cfg: ProxyConfig, launch: LaunchConfig
                         ) -> tuple[ProxyConfig, LaunchConfig]:
    """For kv_aware, launched instances also register (only registered ones publish their
    prefix caches): a registration address (found free when none is given) that every
    instance gets as --proxy-address."""
    if cfg.policy is not PolicyName.KV_AWARE:
        return cfg, launch
    address = cfg.registration_address or f"tcp://127.0.0.1:{_ephemeral_port()}"
    host, _, port = address.rpartition(":")
    connect = f"tcp://127.0.0.1:{port}" if host in ("tcp://*", "tcp://0.0.0.0") else address
    return (replace(cfg, registration_address=address),
            replace(launch, instance_args=(*launch.instance_args, "--proxy-address", connect)))


async def _run_launch(args: argparse.Namespace, cfg: ProxyConfig) -> int:
    stop = _stop_event()
    cfg, launch = with_kv_registration(cfg, launch_config(args, cfg.kv_params_key,
                                                           cfg.registration_key))
    sup = Supervisor(plan_instances(launch))
    runner: web.AppRunner | None = None
    try:
        await sup.start()
        ready = asyncio.ensure_future(sup.wait_ready(args.ready_timeout_s))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not ready.done():
            ready.cancel()
            return 0
        ready.result()
        prefill = tuple(s.url for s in sup.specs if s.role is KVRole.PRODUCER)
        decode = tuple(s.url for s in sup.specs if s.role is not KVRole.PRODUCER)
        cfg = replace(cfg, prefill_urls=(*cfg.prefill_urls, *prefill),
                      decode_urls=(*cfg.decode_urls, *decode), model=launch.model)
        runner = await _start_proxy(cfg)
        await _wait_pools(runner.app, launch.num_prefill, launch.num_decode,
                          POOL_READY_TIMEOUT_S)
        _announce(runner)
        return await _supervise(sup, stop, args.on_instance_exit == "restart",
                                args.max_restarts)
    finally:
        if runner is not None:
            await runner.cleanup()
        await sup.shutdown(args.stop_timeout_s)


def _raise_open_files_limit() -> None:
    # Each stream holds a client socket and an upstream socket: 1,000 streams need > 1,024 fds.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 16 if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``disagg-proxy``; returns the process exit code."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # argparse already printed the usage and the error
        return int(exc.code or 0)

    try:
        configure_logging(args.log_level, args.log_format)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    export_to_children(args.log_level, args.log_format)  # launched instances log like us
    _raise_open_files_limit()
    cfg = proxy_config(args)
    try:
        return asyncio.run(_run_launch(args, cfg) if args.launch else _run_proxy_only(cfg))
    except LaunchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
