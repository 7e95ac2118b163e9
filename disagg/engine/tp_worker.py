"""A tensor-parallel worker process (ranks 1..N-1 of one engine core; see disagg/engine/tp.py).

    python -m disagg.engine.tp_worker FD      FD: its end of the socketpair to rank 0

It holds one shard of the model and its own KV cache tensor (its KV heads), runs every step rank
0 hands it, and answers rank 0's calls: the KV budget, the cache allocation, and the KV
connector's per-rank calls (its own transport endpoint, posts, polls, digests). It never
samples. It exits when rank 0 says so, when rank 0's end closes (rank 0 died), or when a step
fails (the ranks would be out of step; rank 0 sees the exit).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from disagg.common.config import EngineConfig
from disagg.common.logging_setup import configure_logging
from disagg.engine.kv_connector import create_rank_worker
from disagg.engine.model_runner import ModelRunner, resolve_device, resolve_dtype
from disagg.engine.tp import join_group, make_store
from disagg.models.loader import resolve_arch
from disagg.models.parallel import TPContext

logger = logging.getLogger(__name__)
INIT_WAIT_S = 60.0
IDLE_POLL_S = 1.0


class TPWorker:
    """One rank's model shard, KV cache and (optional) KV connector endpoint."""

    def __init__(self, cfg: EngineConfig, rank: int, size: int) -> None:
        self.cfg, self.rank = cfg, rank
        arch = resolve_arch(cfg.model.model)
        device = local_device(cfg, rank)
        dtype = resolve_dtype(cfg.model.dtype, device, arch)
        self.runner = ModelRunner(cfg, arch, device, dtype, arch.max_position_embeddings,
                                  tp=TPContext(rank=rank, size=size))
        self.kv: Any = None

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        """Answer one of rank 0's calls."""
        r = self.runner
        if method == "kv_budget":
            return r.available_kv_bytes(), r.block_bytes()
        if method == "allocate":
            num_blocks, max_model_len = args
            r.allocate_kv_cache(int(num_blocks))
            r.enable_decode_graphs(int(max_model_len))
            return None
        if method == "kv_init":
            assert self.cfg.kv_transfer is not None and r.kv_cache is not None
            self.kv = create_rank_worker(self.cfg.kv_transfer, str(args[0]), self.rank,
                                         r.kv_cache, self.cfg.parallel.data_parallel_rank)
            return self.kv.descriptor()
        if method == "kv":
            if self.kv is None:
                raise RuntimeError("the KV connector of this rank is not started")
            name, kv_args = args
            return self.kv.rpc(str(name), tuple(kv_args))
        raise ValueError(f"unknown call {method!r}")

    def close(self) -> None:
        if self.kv is not None:
            self.kv.close()


def local_device(cfg: EngineConfig, rank: int) -> Any:
    """This rank's device: cuda:rank of the engine core's visible GPUs (set as the process's
    current device before the group starts, so NCCL binds to it), else the CPU."""
    device = resolve_device(cfg.model.device)
    if device.type == "cuda":
        import torch

        device = torch.device("cuda", int(os.environ.get("DISAGG_TP_LOCAL_DEVICE", rank)))
        torch.cuda.set_device(device)
    return device


def serve(conn: Connection, worker: TPWorker, parent: int) -> int:
    """Run steps and calls until told to stop or orphaned; returns the exit code."""
    while True:
        if not conn.poll(IDLE_POLL_S):
            if os.getppid() != parent:
                logger.error("tp%d: the engine core is gone; exiting", worker.rank)
                return 1
            continue
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            logger.error("tp%d: the engine core closed the channel; exiting", worker.rank)
            return 1
        if msg[0] == "step":
            worker.runner.execute_step(msg[1])  # an exception ends the process (out of step)
        elif msg[0] == "call":
            try:
                reply: tuple[str, Any] = ("ok", worker.call(msg[1], msg[2]))
            except Exception as exc:
                logger.warning("tp%d: %s failed: %s", worker.rank, msg[1], exc)
                reply = ("error", f"{type(exc).__name__}: {exc}")
            conn.send(reply)
        elif msg[0] == "shutdown":
            return 0


def main(fd: int) -> int:
    """Process entry: the init message, the group, the shard, then serve."""
    configure_logging(process="tp-worker")  # the frontend's level and format (its environment)
    conn = Connection(fd)
    if not conn.poll(INIT_WAIT_S):
        return 1
    kind, init = conn.recv()
    assert kind == "init"
    cfg = msgspec.msgpack.decode(init["cfg"], type=EngineConfig)
    rank = int(init["rank"])
    if init.get("threads"):
        import torch

        torch.set_num_threads(int(init["threads"]))
    worker = None
    try:
        size, timeout_s = int(init["size"]), float(init["timeout_s"])
        local_device(cfg, rank)
        store = make_store(rank, size, int(init["port"]), timeout_s)
        join_group(rank, size, store, str(init["device_type"]), timeout_s)
        worker = TPWorker(cfg, rank, int(init["size"]))
        return serve(conn, worker, int(init["parent"]))
    except Exception:
        logger.error("tp%d failed: %s", rank, traceback.format_exc())
        return 1
    finally:
        if worker is not None:
            worker.close()


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
