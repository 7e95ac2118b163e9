"""Offline, in-process generation over one EngineCore (tests, ``disagg bench throughput``)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from disagg.common.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from disagg.common.protocol import EngineCoreRequest
from disagg.common.sampling_params import SamplingParams
from disagg.engine.engine_core import EngineCore


@dataclass(slots=True)
class RequestOutput:
    """Final result of one offline request."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: str | None


class LLM:
    """Generate with an in-process engine (no HTTP, no ZMQ)."""

    def __init__(self, model: str = "builtin:tiny-llama", *, device: str = "auto",
                 dtype: str = "auto", quantization: str | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, kv_cache_memory_bytes: int | None = None,
                 load_format: str = "auto", max_model_len: int | None = None,
                 block_size: int = 16, num_gpu_blocks_override: int | None = None,
                 gpu_memory_utilization: float = 0.9, seed: int = 0,
                 enable_chunked_prefill: bool = True, tensor_parallel_size: int = 1,
                 enable_prefix_caching: bool = True, kv_cache_dtype: str = "auto",
                 generation_config: str = "auto",
                 async_scheduling: bool = True) -> None:
        cfg = EngineConfig(
            model=ModelConfig(model=model, served_model_name=model, device=device, dtype=dtype,
                              quantization=quantization, load_format=load_format,
                              max_model_len=max_model_len, seed=seed,
                              generation_config=generation_config),
            cache=CacheConfig(block_size=block_size, kv_cache_memory_bytes=kv_cache_memory_bytes,
                              num_gpu_blocks_override=num_gpu_blocks_override,
                              gpu_memory_utilization=gpu_memory_utilization,
                              enable_prefix_caching=enable_prefix_caching,
                              kv_cache_dtype=kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      enable_chunked_prefill=enable_chunked_prefill,
                                      async_scheduling=async_scheduling),
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size))
        self.engine = EngineCore(cfg)
        self._ids = itertools.count()

    def generate(self, prompt_token_ids: list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams],
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order."""
        params = (sampling_params if isinstance(sampling_params, list)
                  else [sampling_params] * len(prompt_token_ids))
        order: list[str] = []
        results: dict[str, RequestOutput] = {}
        for ids, sp in zip(prompt_token_ids, params, strict=False):
            rid = f"offline-{next(self._ids)}"
            order.append(rid)
            results[rid] = RequestOutput(rid, list(ids), [], None)
            err = self.engine.add_request(EngineCoreRequest(
                request_id=rid, prompt_token_ids=list(ids), sampling_params=sp))
            if err is not None:
                raise ValueError(err)
        pending = set(order)
        while pending:
            for out in self.engine.step():
                res = results[out.request_id]
                res.output_token_ids.extend(out.new_token_ids)
                if out.finish_reason is not None:
                    res.finish_reason = out.finish_reason
                    pending.discard(out.request_id)
        return [results[r] for r in order]

    def close(self) -> None:
        """Stop the engine (its tensor-parallel workers too)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ledger(self) -> dict[str, Any]:
        """Block ledger snapshot (asserted consistent)."""
        self.engine.pool.check()
        return self.engine.pool.snapshot()._asdict()
