"""``vllm serve`` flags that ``disagg serve`` does not have, each with what to do instead.

An operator coming from vLLM gets one line per such flag instead of argparse's bare
"unrecognized arguments" (``unknown_args_message``).
"""

from __future__ import annotations

_LOCAL_ONLY = "give a local model directory or a Hugging Face id already in the local cache " \
              "(nothing is downloaded)"
_NO_GRAPHS = "decode CUDA graphs are sized by disagg; --enforce-eager turns them off"
_LOGS = "use --log-level (it sets the HTTP server's level too)"
_MULTI_NODE = "run one `disagg serve` per node behind `disagg-proxy` instead"
_PROXY_IN_FRONT = "put a reverse proxy (TLS, CORS, paths) in front of disagg"

VLLM_ONLY_FLAGS: dict[str, str] = {
    "--enable-chunked-prefill": "chunked prefill is on by default (--no-chunked-prefill "
                                "turns it off)",
    "--no-enable-chunked-prefill": "use --no-chunked-prefill",
    "--async-scheduling": "async scheduling is on by default (--no-async-scheduling turns it "
                          "off)",
    "--swap-space": "preempted requests are recomputed, never swapped to CPU memory",
    "--cpu-offload-gb": "weights are never offloaded to CPU memory",
    "--pipeline-parallel-size": "use --tensor-parallel-size and/or --data-parallel-size",
    "-pp": "use --tensor-parallel-size and/or --data-parallel-size",
    "--tokenizer-mode": "the model directory's Hugging Face tokenizer is used",
    "--revision": _LOCAL_ONLY,
    "--tokenizer-revision": _LOCAL_ONLY,
    "--code-revision": _LOCAL_ONLY,
    "--download-dir": _LOCAL_ONLY,
    "--max-seq-len-to-capture": _NO_GRAPHS,
    "--cuda-graph-sizes": _NO_GRAPHS,
    "--compilation-config": "nothing is compiled with torch.compile",
    "-O": "nothing is compiled with torch.compile",
    "--uvicorn-log-level": _LOGS,
    "--enable-lora": "LoRA adapters are not supported",
    "--lora-modules": "LoRA adapters are not supported",
    "--max-loras": "LoRA adapters are not supported",
    "--max-lora-rank": "LoRA adapters are not supported",
    "--speculative-config": "speculative decoding is not supported",
    "--guided-decoding-backend": "structured output is not supported (response_format is a 400)",
    "--structured-outputs-config": "structured output is not supported "
                                   "(response_format is a 400)",
    "--enable-auto-tool-choice": "tool calling is not supported (tools is a 400)",
    "--tool-call-parser": "tool calling is not supported (tools is a 400)",
    "--reasoning-parser": "reasoning parsers are not supported",
    "--limit-mm-per-prompt": "text-only models are served",
    "--distributed-executor-backend": "tensor-parallel workers are processes disagg starts",
    "--data-parallel-size-local": _MULTI_NODE,
    "--data-parallel-address": _MULTI_NODE,
    "--data-parallel-rpc-port": _MULTI_NODE,
    "--data-parallel-start-rank": _MULTI_NODE,
    "--headless": _MULTI_NODE,
    "--enable-eplb": "expert load balancing is not supported (--enable-expert-parallel is)",
    "--scheduling-policy": "requests are scheduled first come, first served",
    "--rope-scaling": "edit rope_scaling in the model's config.json",
    "--rope-theta": "edit rope_theta in the model's config.json",
    "--hf-overrides": "edit the model's config.json",
    "--override-generation-config": "give --generation-config PATH with your own "
                                    "generation_config.json",
    "--calculate-kv-scales": "fp8 K/V scales come from the checkpoint (else 1.0)",
    "--enable-sleep-mode": "pause and resume an instance with POST /pause and /resume "
                           "(--admin-key)",
    "--kv-events-config": "prefix-cache events go to the proxy with --proxy-address",
    "--config": "there are no config files: flags and DISAGG_* environment variables only",
    "--ssl-keyfile": _PROXY_IN_FRONT,
    "--ssl-certfile": _PROXY_IN_FRONT,
    "--root-path": _PROXY_IN_FRONT,
    "--allowed-origins": _PROXY_IN_FRONT,
    "--uds": _PROXY_IN_FRONT,
}


def _flag_name(arg: str) -> str:
    """``--swap-space=4`` -> ``--swap-space``; ``-O3`` -> ``-O``."""
    if arg.startswith("--"):
        return arg.partition("=")[0]
    return arg[:2] if arg.startswith("-O") else arg


def unknown_args_message(extras: list[str], command: str = "disagg serve") -> str:
    """argparse's error for arguments it did not recognize, with one hint per vLLM flag."""
    hints = [f"{name} is a vLLM flag {command} does not have: {VLLM_ONLY_FLAGS[name]}"
             for name in dict.fromkeys(_flag_name(a) for a in extras if a.startswith("-"))
             if name in VLLM_ONLY_FLAGS]
    if hints:
        return "; ".join(hints)
    return f"unrecognized arguments: {' '.join(extras)}"
