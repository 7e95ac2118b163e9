"""The engine-core process: a ZMQ loop around EngineCore.

    frontend PUSH --input--> [this process] --output--> frontend PULL
    first output message: EngineCoreReadyResponse (or EngineCoreStartupError), then batches.

The loop blocks on input only while idle (100 ms at most, so connector deadlines are reaped
and a dead parent is noticed), and never blocks while requests are in flight.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from typing import Any

import msgspec
import zmq

from disagg.config import ConfigError, EngineConfig
from disagg.protocol import (
    EngineCoreAbort,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineCoreStartupError,
    EngineCoreUtility,
    EngineCoreUtilityResult,
    encoder,
    inbound_decoder,
)

logger = logging.getLogger(__name__)
IDLE_POLL_MS = 100


def _utility(engine: Any, msg: EngineCoreUtility) -> EngineCoreUtilityResult:
    """Whitelisted engine methods callable from the frontend."""
    try:
        if msg.method == "stats":
            result: Any = msgspec.to_builtins(engine.stats())
        elif msg.method == "kv_abort":
            result = engine.kv_abort(str(msg.args["transfer_id"]))
        elif msg.method == "ledger":
            engine.pool.check()
            result = engine.pool.snapshot()._asdict()
        else:
            return EngineCoreUtilityResult(call_id=msg.call_id,
                                           error=f"unknown utility {msg.method!r}")
        return EngineCoreUtilityResult(call_id=msg.call_id, result=result)
    except Exception as exc:  # reported to the caller, engine keeps serving
        return EngineCoreUtilityResult(call_id=msg.call_id, error=f"{type(exc).__name__}: {exc}")


def _handle_inputs(engine: Any, sock: zmq.Socket, out_sock: zmq.Socket, block_ms: int) -> None:
    """Drain the input socket, blocking up to block_ms for the first message."""
    errors: list[EngineCoreOutput] = []
    if not sock.poll(block_ms):
        return
    while True:
        try:
            frame = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            break
        msg = inbound_decoder.decode(frame)
        if isinstance(msg, EngineCoreRequest):
            err = engine.add_request(msg)
            if err is not None:
                errors.append(EngineCoreOutput(msg.request_id, [], "error", error=err))
        elif isinstance(msg, EngineCoreAbort):
            engine.abort(msg.request_ids)
        elif isinstance(msg, EngineCoreUtility):
            out_sock.send(encoder.encode(_utility(engine, msg)))
    if errors:
        out_sock.send(encoder.encode(EngineCoreOutputs(
            dp_rank=engine.cfg.parallel.data_parallel_rank, outputs=errors)))


def run_engine_core(cfg_bytes: bytes, input_addr: str, output_addr: str) -> None:
    """Process entry point (multiprocessing spawn target)."""
    logging.basicConfig(level=os.environ.get("DISAGG_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s engine: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when we stop
    parent = os.getppid()
    ctx = zmq.Context()
    in_sock = ctx.socket(zmq.PULL)
    in_sock.connect(input_addr)
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.setsockopt(zmq.LINGER, 2000)
    out_sock.connect(output_addr)
    engine = None
    try:
        cfg = msgspec.msgpack.decode(cfg_bytes, type=EngineConfig)
        from disagg.engine_core import build_engine

        engine = build_engine(cfg)
        out_sock.send(encoder.encode(engine.ready_response()))
        _loop(engine, in_sock, out_sock, parent)
    except ConfigError as exc:
        out_sock.send(encoder.encode(EngineCoreStartupError(str(exc))))
        sys.exit(2)
    except Exception as exc:
        logger.error("engine core failed: %s", traceback.format_exc())
        out_sock.send(encoder.encode(EngineCoreStartupError(f"{type(exc).__name__}: {exc}")))
        sys.exit(1)
    finally:
        if engine is not None:
            engine.close()
        out_sock.close(linger=1000)
        in_sock.close(linger=0)
        ctx.term()


def _loop(engine: Any, in_sock: zmq.Socket, out_sock: zmq.Socket, parent: int) -> None:
    """Step forever; stats go out at least every second; exit when the frontend is gone."""
    rank = engine.cfg.parallel.data_parallel_rank
    last_beat = time.monotonic()
    while True:
        busy = engine.has_work()
        _handle_inputs(engine, in_sock, out_sock, 0 if busy else IDLE_POLL_MS)
        outputs = engine.step()
        now = time.monotonic()
        if outputs or busy or now - last_beat >= 1.0:
            out_sock.send(encoder.encode(EngineCoreOutputs(dp_rank=rank, outputs=outputs,
                                                           stats=engine.stats())))
        if now - last_beat >= 1.0:
            last_beat = now
            if os.getppid() != parent:  # orphaned: the frontend died, maybe by SIGKILL
                logger.error("frontend process is gone; engine core exits")
                return
