"""vLLM's model flags on `disagg serve`: --tokenizer, --chat-template, --trust-remote-code,
--enforce-eager, --max-logprobs reach the config, the tokenizer and the API limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from disagg.cli import build_parser, engine_config_from_args
from disagg.common.config import ConfigError

OK: dict[str, Any] = {"model": "builtin:tiny-llama", "prompt": "hi", "max_tokens": 2}


def _config(*argv: str) -> Any:
    return engine_config_from_args(build_parser().parse_args(["serve", *argv]))


def test_the_flags_reach_the_model_config(tmp_path: Path) -> None:
    cfg = _config("--tokenizer", str(tmp_path), "--chat-template", "{{ x }}",
                  "--trust-remote-code", "--enforce-eager", "--max-logprobs", "5")
    m = cfg.model
    assert (m.tokenizer, m.chat_template, m.trust_remote_code, m.enforce_eager,
            m.max_logprobs) == (str(tmp_path), "{{ x }}", True, True, 5)
    defaults = _config().model
    assert (defaults.tokenizer, defaults.chat_template, defaults.trust_remote_code,
            defaults.enforce_eager, defaults.max_logprobs) == (None, None, False, False, 20)
    with pytest.raises(ConfigError, match="--max-logprobs"):
        _config("--max-logprobs", "5000")


async def test_max_logprobs_bounds_what_a_request_may_ask(instance_client: Any) -> None:
    client = await instance_client(max_logprobs=2)
    resp = await client.post("/v1/completions", json={**OK, "logprobs": 2})
    assert resp.status == 200, await resp.text()
    resp = await client.post("/v1/completions", json={**OK, "logprobs": 3})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == "logprobs"
    assert "--max-logprobs" in body["error"]["message"]
    resp = await client.post("/v1/chat/completions", json={
        "model": OK["model"], "messages": [{"role": "user", "content": "hi"}],
        "logprobs": True, "top_logprobs": 3})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "top_logprobs"
