"""``disagg serve``: engine cores first (ready handshake), then the HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

import msgspec
from aiohttp import web

from disagg.common import envs
from disagg.common.config import EngineConfig
from disagg.common.generation_config import SamplingDefaults, load_generation_config
from disagg.common.http_server import setup_runner
from disagg.common.memory_split import describe_memory
from disagg.common.registration import InstanceInfo
from disagg.common.tokenizer import Tokenizer
from disagg.server.api_server import ServerInfo, instance_info_dict, make_app
from disagg.server.engine_client import EngineClient, SyncedConfig
from disagg.server.engine_health import EngineStartupError
from disagg.server.kv_events import KVPublisher
from disagg.server.registrar import Registrar

logger = logging.getLogger("disagg.serve")
PARENT_POLL_S = 0.5
"""How often an instance started by a launcher checks that the launcher still runs."""
DEAD_CLEANUP_S = 0.5
"""After an engine core died: how long open handlers get to finish their 503s and error events
before the server exits anyway (a supervisor restarts it; aiohttp's own drain is 60 s)."""


def _start_registrar(args: argparse.Namespace, engine: EngineClient, info: ServerInfo) -> Any:
    """Register with a proxy over ZMQ when --proxy-address is given."""
    if not args.proxy_address:
        return None
    details = msgspec.convert(instance_info_dict(engine, info), InstanceInfo)
    kv = None
    if details.hash_seed is not None:  # with a prefix cache: publish it for KV-aware routing
        kv = KVPublisher(engine.kv_view, details.http_url, details.engine_id)
    registrar = Registrar(args.proxy_address, details, kv=kv, unavailable=engine.unavailable,
                          key=args.registration_key)
    registrar.start()
    return registrar


def sampling_defaults(cfg: EngineConfig) -> SamplingDefaults:
    """The model's generation-config defaults for omitted request fields, said once at start
    (as vLLM does), with any it sets that disagg cannot apply."""
    gen = load_generation_config(cfg.model.model, cfg.model.generation_config)
    if gen.defaults.describe():
        logger.info("default sampling parameters from the model's generation config: %s "
                    "(--generation-config vllm ignores them)", gen.defaults.describe())
    if gen.ignored:
        logger.warning("the model's generation config sets %s, which disagg does not "
                       "implement: not applied", ", ".join(gen.ignored))
    return gen.defaults


def startup_lines(cfg: EngineConfig, synced: SyncedConfig, url: str) -> list[str]:
    """What an operator checks first: the model and its synced limits; with a connector, the
    role, transport, mode, KV ports and deadlines (rank 0's ports; each DP rank has its own)."""
    r0 = synced.ready[0]
    par = cfg.parallel
    lines = [f"serving {cfg.model.model} as {cfg.model.served_model_name} on {url}: "
             f"max_model_len={synced.max_model_len}, block_size={synced.block_size}, "
             f"num_gpu_blocks={synced.num_gpu_blocks}, dtype={synced.dtype}, "
             f"kv_cache_dtype={r0.kv_cache_dtype or synced.dtype}, device={r0.device}, "
             f"dp={par.data_parallel_size}, tp={r0.tp_size}"]
    lines += [f"dp{r.dp_rank}: {describe_memory(r.memory_bytes)}" for r in synced.ready
              if r.memory_bytes]
    kv = cfg.kv_transfer
    if kv is not None:
        extra = kv.kv_connector_extra_config
        ports = ", ".join(f"{r.kv_handshake_port}/{r.kv_notify_port}" for r in synced.ready)
        line = (f"KV connector {kv.kv_connector}: role={r0.kv_role}, "
                f"transport={extra.get('transport', 'tcp')}, mode={r0.kv_mode}, "
                f"kv_host={r0.kv_host}, handshake/notify ports={ports}")
        if kv.kv_connector == "PDConnector":
            from connectors.pd_config import parse_timeouts

            t = parse_timeouts(extra)
            line += (f", transfer_timeout={t.transfer_timeout_s:g} s, "
                     f"defer_timeout={t.defer_timeout_s:g} s, "
                     f"lease_timeout={t.lease_timeout_s:g} s")
        lines.append(line)
    return lines


def _bind(host: str, port: int) -> list[socket.socket]:
    """The HTTP sockets, bound but not listening: one per address ``host`` resolves to (""
    means every interface), all on ``port`` (0: the port the OS gives the first). Connections
    are refused until the server listens, once the engine is ready, as before binding moved
    ahead of the engine's start (a port in use is one line at once)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:  # the same port on every address
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class _StartError(Exception):
    """Start-up failed in a way the user can fix: one line, exit 2."""


async def serve(cfg: EngineConfig, args: argparse.Namespace, tokenizer: Tokenizer) -> int:
    """Run until SIGINT/SIGTERM, an engine core's death or (launched) the launcher's; returns
    the exit code. The HTTP port is bound before the engine loads weights and listens once it
    is ready."""
    try:
        socks = _bind_or_fail(args)
    except _StartError as exc:
        print(f"disagg: error: {exc}", file=sys.stderr)
        return 2
    parent = _launcher_pid()
    parent_task = None if parent is None else asyncio.create_task(_parent_gone(parent))
    engine = EngineClient(cfg, envs.engine_ready_timeout_s())
    try:
        synced = await _start_engine(engine, parent_task)
        host = f"[{args.host}]" if ":" in args.host else (args.host or "0.0.0.0")
        url = f"http://{host}:{socks[0].getsockname()[1]}"  # --port 0: the port it got
        info = _server_info(cfg, args, url)
        runner = await _serve_http(make_app(engine, tokenizer, info), socks, args)
    except _StartError as exc:
        for sock in socks:
            sock.close()
        await engine.shutdown()
        print(f"disagg: error: {exc}", file=sys.stderr)
        return 2
    registrar = _start_registrar(args, engine, info)
    for line in startup_lines(cfg, synced, url):
        logger.info("%s", line)
    print(f"disagg: ready on {url} (max_model_len={synced.max_model_len}, "
          f"block_size={synced.block_size}, num_gpu_blocks={synced.num_gpu_blocks})",
          flush=True)
    await _until_stopped(engine, parent_task)
    if engine.dead:
        print(f"disagg: error: {engine.dead}; shutting down", file=sys.stderr, flush=True)
        await _stop_after_death(runner, engine, registrar)
        return 1
    if registrar is not None:
        with contextlib.suppress(Exception):
            registrar.stop()
    await runner.cleanup()
    await engine.shutdown()
    return 0


def _bind_or_fail(args: argparse.Namespace) -> list[socket.socket]:
    try:  # before the engine loads weights: a port in use is one line at once
        return _bind(args.host, args.port)
    except OSError as exc:
        raise _StartError(f"cannot listen on {args.host}:{args.port}: "
                          f"{exc.strerror or exc}") from None


async def _start_engine(engine: EngineClient,
                        parent_task: asyncio.Task[None] | None) -> SyncedConfig:
    """The engine cores ready; a launcher gone meanwhile (SIGKILLed while the weights load)
    stops the start."""
    starting = asyncio.create_task(engine.start())
    try:
        if parent_task is not None:
            await asyncio.wait({starting, parent_task}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(BaseException):
                    await starting
                raise _StartError("the launcher is gone")
        return await starting
    except EngineStartupError as exc:
        raise _StartError(str(exc)) from None


def _server_info(cfg: EngineConfig, args: argparse.Namespace, url: str) -> ServerInfo:
    return ServerInfo(cfg.model.served_model_name, cfg.model.model, url, args.admin_key,
                      kv_params_key=args.kv_params_key or envs.kv_params_key(),
                      api_key=args.api_key or envs.api_key(),
                      model_aliases=tuple((args.served_model_name or [])[1:]),
                      sampling_defaults=sampling_defaults(cfg),
                      max_logprobs=cfg.model.max_logprobs,
                      log_requests=args.enable_log_requests,
                      log_stats_interval_s=(None if args.disable_log_stats
                                            else envs.log_stats_interval_s()))


async def _serve_http(app: web.Application, socks: list[socket.socket],
                      args: argparse.Namespace) -> web.AppRunner:
    """Listen on the bound sockets (the engine is ready)."""
    runner = await setup_runner(app, handler_cancellation=True, access_log=None)
    try:
        for sock in socks:
            await web.SockSite(runner, sock, backlog=2048).start()
    except OSError as exc:  # another process took the port meanwhile (SO_REUSEADDR)
        await runner.cleanup()
        raise _StartError(f"cannot listen on {args.host}:{args.port}: "
                          f"{exc.strerror or exc}") from None
    return runner


async def _until_stopped(engine: EngineClient, parent_task: asyncio.Task[None] | None) -> None:
    """Until SIGINT/SIGTERM, an engine core's death or the launcher's."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: set[asyncio.Task[Any]] = {asyncio.create_task(stop.wait()),
                                     asyncio.create_task(engine.dead_event.wait())}
    if parent_task is not None:
        tasks.add(parent_task)
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        t.cancel()


def _launcher_pid() -> int | None:
    """The launcher this instance must not outlive (DISAGG_PARENT_PID), if it is the parent:
    an inherited variable naming another process is ignored."""
    parent = envs.parent_pid()
    if parent is not None and parent != os.getppid():
        logger.warning("DISAGG_PARENT_PID=%d is not this process's parent: ignored", parent)
        return None
    return parent


async def _parent_gone(parent: int) -> None:
    """Returns once the process that started this one (a ``disagg-proxy --launch``) is gone,
    even SIGKILLed: the instance then shuts down as on SIGTERM instead of living on."""
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_POLL_S)
    logger.warning("the launcher (pid %d) is gone: shutting down", parent)


async def _stop_after_death(runner: web.AppRunner, engine: EngineClient, registrar: Any) -> None:
    """Exit fast once an engine core died: every open request already got its 503, so nothing
    is worth aiohttp's graceful drain, and the other ranks are only terminated."""
    if registrar is not None:
        with contextlib.suppress(Exception):
            registrar.stop(timeout_s=DEAD_CLEANUP_S)
    try:
        await asyncio.wait_for(runner.cleanup(), DEAD_CLEANUP_S)
    except Exception as exc:  # a timeout, or a failing handler: exiting anyway, say why
        logger.warning("HTTP shutdown cut short after the engine death: %r", exc)
    await engine.shutdown(timeout_s=DEAD_CLEANUP_S)
