"""In-process instance API servers over a fake engine (no engine-core process, no model)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from disagg.common.kv_transfer_params import KVTransferParams
from disagg.common.pause import FrontendPause
from disagg.common.protocol import (
    EngineCoreOutput,
    EngineCoreRequest,
    TokenLogprob,
    encoder,
    inbound_decoder,
)
from disagg.common.sampling_params import SamplingParams
from disagg.common.tokenizer import get_tokenizer
from disagg.server.api_server import ServerInfo, make_app
from disagg.server.engine_client import RequestHandle, SyncedConfig

MODEL = "builtin:tiny-llama"
MAX_MODEL_LEN = 256


class FakeEngine:
    """The EngineClient surface the HTTP layer uses; every accepted request goes through the
    real frontend -> engine encoding and is seeded like the sampler does, so a value the edge
    lets through but the engine cannot take fails the test instead of passing silently."""

    dead: str | None = None
    dp_size = 1

    def unavailable(self) -> str | None:
        """As EngineClient: why it cannot serve (dead; this fake never stalls)."""
        return self.dead

    def __init__(self) -> None:
        self.synced = SyncedConfig(MAX_MODEL_LEN, 64, 16, "float32", ())
        self.handles: dict[str, RequestHandle] = {}
        self.stats: dict[int, Any] = {}
        self.pause_state = FrontendPause(1)
        self.requests: list[EngineCoreRequest] = []
        self.aborted_transfers: list[str] = []
        self.script: list[EngineCoreOutput] | None = None
        """When set: the outputs every request gets (request ids replaced), instead of three
        tokens at once."""
        self.aborted: list[str] = []

    async def add_request(self, request_id: str, prompt_token_ids: list[int],
                          params: SamplingParams,
                          kv_transfer_params: KVTransferParams | None = None,
                          cache_salt: str | None = None) -> RequestHandle:
        """Encode and decode the request as the wire does, then answer three tokens at once."""
        frame = encoder.encode(EngineCoreRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
            kv_transfer_params=kv_transfer_params, cache_salt=cache_salt))
        req = inbound_decoder.decode(frame)
        assert isinstance(req, EngineCoreRequest)
        self.requests.append(req)
        if params.seed is not None:
            import torch

            torch.Generator().manual_seed(params.seed)
        handle = RequestHandle(request_id, 0, len(prompt_token_ids), params.max_tokens)
        if self.script is not None:
            for out in self.script:
                handle.queue.put_nowait(msgspec.structs.replace(out, request_id=request_id))
            return handle
        num_out = min(params.max_tokens, 3)
        lps = None if params.logprobs is None else [
            TokenLogprob(-0.5, [(65, -0.5)] * params.logprobs) for _ in range(num_out)]
        handle.queue.put_nowait(EngineCoreOutput(request_id, [65] * num_out, "length", lps))
        return handle

    async def abort(self, request_id: str) -> None:
        """Nothing runs, so nothing to abort; recorded."""
        self.aborted.append(request_id)

    async def utility(self, method: str, args: dict[str, Any] | None = None,
                      timeout_s: float = 10.0) -> list[Any]:
        """kv_abort and ledger of one idle rank."""
        if method == "kv_abort":
            self.aborted_transfers.append((args or {})["transfer_id"])
            return [False]
        return [{"free": 64, "total": 64, "held": 0}]

    async def collective_rpc(self, method: str, args: dict[str, Any],
                             timeout_s: float) -> list[Any]:
        """One rank's answer."""
        return [{"method": method}]


InstanceClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def instance_client() -> AsyncIterator[InstanceClient]:
    """Factory: ``await instance_client(kv_params_key=..., admin_key=...)`` -> a TestClient of
    the real instance app over a FakeEngine (``client.app`` holds it)."""
    clients: list[TestClient[Any, Any]] = []

    async def make(**info: Any) -> TestClient[Any, Any]:
        server_info = ServerInfo(**{"served_model_name": MODEL, "model": MODEL,
                                    "http_url": "http://127.0.0.1:0", "kv_params_key": None,
                                    **info})
        app = make_app(FakeEngine(), get_tokenizer(MODEL), server_info)  # type: ignore[arg-type]
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
