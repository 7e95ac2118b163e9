"""P/D on two GPUs of one host: ipc and nixl, READ and WRITE, outputs equal a monolithic GPU
instance's (run on a lent 2-GPU machine: pytest -m multi_gpu tests/connectors/test_pd_gpu.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest
import torch
from pd_helpers import info, kv_config, metric, pd_request, settled_metric, wait_clean

from disagg.engine.kv_sizing import bytes_per_block
from disagg.engine.model_runner import resolve_dtype
from disagg.models.loader import resolve_arch

pytestmark = [pytest.mark.multi_gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]

GPU = ["builtin:tiny-llama", "--device", "cuda", "--gpu-memory-utilization", "0.2",
       "--max-model-len", "512"]
PROMPT_LENS = (1, 16, 17, 300)


def _start(instance_factory: Any, mode: str, transport: str, p_args: Sequence[str] = (),
           **extra: Any) -> tuple[Any, Any, Any]:
    """Prefill on GPU 0, decode on GPU 1, monolithic on GPU 0."""
    p = instance_factory([*GPU, *p_args, "--kv-transfer-config",
                          kv_config("kv_producer", mode, transport, **extra)],
                         env={"CUDA_VISIBLE_DEVICES": "0,1"}, ready_timeout_s=180)
    d = instance_factory([*GPU, "--kv-transfer-config",
                          kv_config("kv_consumer", mode, transport, **extra)],
                         env={"CUDA_VISIBLE_DEVICES": "1,0"}, ready_timeout_s=180)
    mono = instance_factory(GPU, env={"CUDA_VISIBLE_DEVICES": "0,1"}, ready_timeout_s=180)
    return p, d, mono


def _assert_equal_outputs(p: Any, d: Any, mono: Any, mode: str) -> None:
    p_info, d_info = info(p.url), info(d.url)

    async def go() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            for n in PROMPT_LENS:
                body = {"prompt": [(5 * i) % 250 + 1 for i in range(n)], "max_tokens": 8,
                        "temperature": 0, "ignore_eos": True, "return_token_ids": True}
                async with s.post(mono.url + "/v1/completions", json=body) as r:
                    expected = (await r.json())["choices"][0]["token_ids"]
                status, out = await pd_request(s, p.url, d.url, body, mode, p_info, d_info)
                assert status == 200, out
                assert out["choices"][0]["token_ids"] == expected, n

    asyncio.run(go())


@pytest.mark.parametrize("transport", ["ipc", "nixl"])
@pytest.mark.parametrize("mode", ["read", "write"])
def test_pd_two_gpus_equals_monolithic(instance_factory, transport: str, mode: str) -> None:
    p, d, mono = _start(instance_factory, mode, transport)
    _assert_equal_outputs(p, d, mono, mode)
    wait_clean(p.url)
    wait_clean(d.url)


@pytest.mark.parametrize("transport", ["ipc", "nixl"])
@pytest.mark.parametrize("layerwise", [True, False])
def test_pd_two_gpus_layerwise_write_equals_monolithic(instance_factory, transport: str,
                                                        layerwise: bool) -> None:
    """WRITE streaming each layer during the prefill (ipc: stream-ordered posts; nixl: the
    poster thread after a CUDA event) or one WRITE after it; the prefill is chunked every
    40 tokens. Each transferred block moves exactly once either way. P waits for the decode's
    blocks (early_start off), so a prefill that streams always has somewhere to stream to."""
    p, d, mono = _start(instance_factory, "write", transport,
                        ["--max-num-batched-tokens", "40"], layerwise=layerwise,
                        early_start=False)
    _assert_equal_outputs(p, d, mono, "write")
    arch = resolve_arch("builtin:tiny-llama")
    bs = info(p.url)["block_size"]
    itemsize = resolve_dtype("auto", torch.device("cuda"), arch).itemsize
    num_blocks = sum(-(-(n - 1) // bs) for n in PROMPT_LENS)
    expected_bytes = num_blocks * bytes_per_block(arch.num_layers, bs, arch.num_kv_heads,
                                                  arch.head_dim, itemsize)
    assert settled_metric(p.url, "disagg_kv_connector_bytes_moved_total",
                          expected_bytes) == expected_bytes
    assert (metric(p.url, "disagg_kv_connector_layer_posts_total") > 0) is layerwise
    wait_clean(p.url)
    wait_clean(d.url)
