"""P/D on two GPUs of one host: ipc and nixl, READ and WRITE, outputs equal a monolithic GPU
instance's (run on a lent 2-GPU machine: pytest -m multi_gpu tests/connectors/test_pd_gpu.py)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch
from pd_helpers import info, kv_config, pd_request, wait_clean

pytestmark = [pytest.mark.multi_gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]

GPU = ["builtin:tiny-llama", "--device", "cuda", "--gpu-memory-utilization", "0.2",
       "--max-model-len", "512"]


@pytest.mark.parametrize("transport", ["ipc", "nixl"])
@pytest.mark.parametrize("mode", ["read", "write"])
def test_pd_two_gpus_equals_monolithic(instance_factory, transport: str, mode: str) -> None:
    p = instance_factory([*GPU, "--kv-transfer-config", kv_config("kv_producer", mode,
                                                                  transport)],
                         env={"CUDA_VISIBLE_DEVICES": "0,1"}, ready_timeout_s=180)
    d = instance_factory([*GPU, "--kv-transfer-config", kv_config("kv_consumer", mode,
                                                                  transport)],
                         env={"CUDA_VISIBLE_DEVICES": "1,0"}, ready_timeout_s=180)
    mono = instance_factory(GPU, env={"CUDA_VISIBLE_DEVICES": "0,1"}, ready_timeout_s=180)
    p_info, d_info = info(p.url), info(d.url)

    async def go() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            for n in (1, 16, 17, 300):
                body = {"prompt": [(5 * i) % 250 + 1 for i in range(n)], "max_tokens": 8,
                        "temperature": 0, "ignore_eos": True, "return_token_ids": True}
                async with s.post(mono.url + "/v1/completions", json=body) as r:
                    expected = (await r.json())["choices"][0]["token_ids"]
                status, out = await pd_request(s, p.url, d.url, body, mode, p_info, d_info)
                assert status == 200, out
                assert out["choices"][0]["token_ids"] == expected, n

    asyncio.run(go())
    wait_clean(p.url)
    wait_clean(d.url)
