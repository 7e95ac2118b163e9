"""The ``disagg`` command: serve, bench, doctor."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from disagg.common import envs
from disagg.common.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    checked,
    parse_bytes,
    parse_max_model_len,
    port_number,
    positive_float,
)
from disagg.common.generation_config import load_generation_config
from disagg.common.help_formatter import DefaultsHelpFormatter, OneLineErrorParser
from disagg.common.hf_cache import resolve_model
from disagg.common.logging_setup import add_logging_args, configure_logging, export_to_children
from disagg.common.registration import check_key, zmq_address
from disagg.common.tokenizer import frontend_tokenizer
from disagg.common.version import __version__
from disagg.vllm_flags import unknown_args_message

logger = logging.getLogger("disagg")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``disagg serve`` and the offline LLM entry points."""
    p.add_argument("model", nargs="?", default="builtin:tiny-llama",
                   help="builtin:tiny-llama, builtin:tiny-moe, a Hugging Face model directory "
                        "or a Hub id already in the local cache")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="name(s) the API accepts in the 'model' field; the first is the one "
                        "reported (default: the model argument)")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|PATH",
                   help="whose generation_config.json gives the EOS ids and the defaults of "
                        "omitted sampling fields: auto (the model's), vllm (no sampling "
                        "defaults; the model's EOS ids still stop), or a directory/file "
                        "(default %(default)s)")
    p.add_argument("--tokenizer", default=None, metavar="PATH_OR_ID",
                   help="tokenizer directory or cached Hub id when it differs from the model's "
                        "(default: the model's)")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="Jinja chat template, a file or the template itself, replacing the "
                        "tokenizer's (default: the tokenizer's own)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run a tokenizer's own code; the model itself is "
                        "always one of the built-in architectures (default: off)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="never capture CUDA/HIP graphs: every decode step runs eagerly "
                        "(default: off, graphs on GPU)")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="the most logprobs / top_logprobs a request may ask for per token, "
                        "at most 1024 (default %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: a GPU when torch sees one (cuda means any torch GPU, ROCm "
                        "included), else the CPU")
    p.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16")
    p.add_argument("--quantization", default=None,
                   help="fp8: fp8 weights with 128x128 block scales, quantized at load "
                        "(default: none, or fp8 for a checkpoint whose config.json has "
                        "quantization_config)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="auto: weights from the model's files; dummy: random weights")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of dummy weights and of requests without their own seed")
    p.add_argument("--max-model-len", type=parse_max_model_len, default=None,
                   help="tokens, e.g. 4096, 32k, or auto / -1 to fit the KV cache (default: "
                        "the model's own)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (1-256)")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="KV cache element type: auto (the model's dtype) or fp8 / fp8_e4m3 "
                        "(e4m3, fnuz on MI300; per-layer K/V scales from the checkpoint's "
                        "k_scale/v_scale, else 1.0): half the bytes per block and per transfer; "
                        "P/D peers must use the same")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory the instance may use: weights, activations "
                        "and the KV cache")
    p.add_argument("--kv-cache-memory-bytes", type=parse_bytes, default=None,
                   help="explicit KV cache budget, e.g. 256MiB (default: measured on a GPU, "
                        "256MiB on CPU)")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="use exactly this many KV blocks (default: what the budget holds)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True, help="reuse the KV of cached prompt prefixes")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="most requests in one engine step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="most tokens in one engine step (prefill chunks and decodes)")
    p.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill each prompt in one step instead of chunks")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="read each decode step's tokens before scheduling the next (async "
                        "scheduling, the default for greedy decode batches without TP, P/D decode "
                        "instances included, prepares the next step while the device runs this "
                        "one)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="GPUs (worker processes) per engine core; -dp M -tp N uses M*N GPUs "
                        "(default: %(default)s)")
    p.add_argument("--tp-timeout", type=positive_float, default=120.0,
                   help="deadline in seconds for every tensor-parallel collective and worker "
                        "start")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine-core processes behind this one HTTP server")
    p.add_argument("--dp-lockstep", action="store_true",
                   help="data-parallel ranks step together (what expert-parallel MoE needs)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="shard MoE experts over the -dp ranks (all-to-all in every MoE layer; "
                        "implies --dp-lockstep)")
    p.add_argument("--dp-collective-timeout", type=positive_float, default=120.0,
                   help="deadline in seconds for every collective among the ranks")
    p.add_argument("--kv-transfer-config", default=None,
                   help='JSON, e.g. {"kv_connector":"PDConnector","kv_role":"kv_producer",...} '
                        "(default: none, a monolithic instance)")


def check_device(device: str) -> None:
    """``--device cuda`` on this machine: a ConfigError when torch sees no GPU (checked when
    serving, not when a deployment's flags are validated elsewhere)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no GPU here (torch.cuda.is_available() "
                              "is false: a CPU-only torch, or no visible device); use --device "
                              "cpu or auto")


def engine_config_from_args(a: argparse.Namespace) -> EngineConfig:
    """Validate flags into a frozen EngineConfig."""
    if a.block_size < 1 or a.block_size > 256:
        raise ConfigError("--block-size must be between 1 and 256")
    if a.max_num_seqs < 1 or a.max_num_batched_tokens < 1:
        raise ConfigError("--max-num-seqs and --max-num-batched-tokens must be positive")
    if a.data_parallel_size < 1:
        raise ConfigError("--data-parallel-size must be at least 1")
    if not 1 <= a.tensor_parallel_size <= 64:
        raise ConfigError("--tensor-parallel-size must be between 1 and 64")
    if a.tp_timeout <= 0:
        raise ConfigError("--tp-timeout must be positive")
    if a.enable_expert_parallel and a.data_parallel_size < 2:
        raise ConfigError("--enable-expert-parallel shards experts over data-parallel ranks: "
                          "add -dp N with N >= 2")
    if a.enable_expert_parallel and a.tensor_parallel_size > 1:
        raise ConfigError("--enable-expert-parallel with -tp > 1 is not built yet: use -dp "
                          "alone (experts over DP ranks) or -tp alone (experts split by TP)")
    if a.dp_collective_timeout <= 0:
        raise ConfigError("--dp-collective-timeout must be positive")
    if not 0 < a.gpu_memory_utilization <= 1:
        raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
    if a.served_model_name is not None and not all(n.strip() for n in a.served_model_name):
        raise ConfigError("--served-model-name: a name must not be empty")
    model = resolve_model(a.model)  # a Hub id: its snapshot in the local cache, else one line
    load_generation_config(model, a.generation_config)  # a bad path or file: one line now
    kv_transfer = KVTransferConfig.from_json(a.kv_transfer_config)
    if kv_transfer is not None:
        from disagg.engine.kv_connector import check_connector_config

        check_connector_config(kv_transfer, a.data_parallel_size, a.tensor_parallel_size)
    return EngineConfig(
        model=ModelConfig(model=model,
                          served_model_name=(a.served_model_name or [a.model])[0],
                          generation_config=a.generation_config,
                          tokenizer=a.tokenizer, chat_template=a.chat_template,
                          trust_remote_code=a.trust_remote_code,
                          enforce_eager=a.enforce_eager, max_logprobs=a.max_logprobs,
                          dtype=a.dtype, quantization=a.quantization, device=a.device,
                          load_format=a.load_format,
                          seed=a.seed, max_model_len=a.max_model_len),
        cache=CacheConfig(block_size=a.block_size,
                          gpu_memory_utilization=a.gpu_memory_utilization,
                          kv_cache_memory_bytes=a.kv_cache_memory_bytes,
                          num_gpu_blocks_override=a.num_gpu_blocks_override,
                          enable_prefix_caching=a.enable_prefix_caching,
                          kv_cache_dtype=a.kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_seqs=a.max_num_seqs,
                                  max_num_batched_tokens=a.max_num_batched_tokens,
                                  enable_chunked_prefill=not a.no_chunked_prefill,
                                  async_scheduling=not a.no_async_scheduling),
        parallel=ParallelConfig(tensor_parallel_size=a.tensor_parallel_size,
                                tensor_parallel_timeout_s=a.tp_timeout,
                                data_parallel_size=a.data_parallel_size,
                                data_parallel_lockstep=(a.dp_lockstep or envs.dp_lockstep()
                                                        or a.enable_expert_parallel),
                                enable_expert_parallel=a.enable_expert_parallel,
                                data_parallel_timeout_s=a.dp_collective_timeout),
        kv_transfer=kv_transfer)


class _Parser(OneLineErrorParser):
    """argparse, with a hint for each vLLM flag among unrecognized arguments."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """Like argparse's, but unknown vLLM flags get a line saying what to do instead."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unknown_args_message(extras))
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser."""
    parser = _Parser(prog="disagg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"disagg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one OpenAI-compatible instance",
                           description="Run one OpenAI-compatible instance.",
                           formatter_class=DefaultsHelpFormatter)
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address the HTTP server listens on")
    serve.add_argument("--port", type=port_number, default=8000, help="HTTP port")
    serve.add_argument("--admin-key", default=None,
                       help="Bearer key of the admin API: /pause, /resume, /collective_rpc "
                            "(default: none, the admin API is off)")
    serve.add_argument("--api-key", default=None,
                       help="every /v1/* request must send 'Authorization: Bearer KEY' "
                            "(/health, /metrics, /tokenize stay open; default: env "
                            "DISAGG_API_KEY or VLLM_API_KEY, else open)")
    serve.add_argument("--kv-params-key", default=None,
                       help="shared secret: requests with kv_transfer_params and KV aborts "
                            "must send it in header X-Disagg-KV-Key (the proxy does; default: "
                            "env DISAGG_KV_PARAMS_KEY, else none needed)")
    serve.add_argument("--proxy-address", default=None, type=checked(zmq_address),
                       help="tcp://HOST:PORT of a disagg proxy to register with (default: "
                            "none, the proxy lists this instance itself)")
    serve.add_argument("--registration-key", default=None, type=checked(check_key),
                       help="shared secret sealing every registration frame (the proxy's "
                            "--registration-key; default: env DISAGG_REGISTRATION_KEY, else "
                            "unsealed)")
    serve.add_argument("--enable-log-requests", action="store_true", default=False,
                       help="log one line per request when it arrives (id, prompt tokens, "
                            "sampling params, KV transfer role) and one when it ends (finish "
                            "reason, tokens, TTFT, end-to-end time)")
    serve.add_argument("--disable-log-requests", dest="enable_log_requests",
                       action="store_false", default=False,
                       help="the inverse of --enable-log-requests, for older vLLM scripts "
                            "(default: requests are not logged)")
    add_logging_args(serve)
    sub.add_parser("bench", help="benchmarks: serve | throughput | transfer", add_help=False)
    sub.add_parser("doctor", help="what this machine can do, and why not", add_help=False)
    return parser


def _run_subcommand(name: str, argv: list[str]) -> int:
    """A command another package provides through the ``disagg.commands`` entry points (the
    CLI does not import the bench package; pyproject.toml names it)."""
    found = entry_points(group="disagg.commands", name=name)
    if not found:
        print(f"disagg: error: 'disagg {name}' is not installed (pip install -e . from the "
              "repository)", file=sys.stderr)
        return 2
    command: Callable[[list[str]], int] = next(iter(found)).load()
    return command(argv)


def _env_registration_key() -> str | None:
    try:
        return check_key(envs.registration_key())
    except ValueError as exc:
        raise ConfigError(f"{envs.REGISTRATION_KEY_ENV}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``disagg`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        return _run_subcommand("bench", argv[1:])
    if argv and argv[0] == "doctor":
        from disagg.doctor import main as doctor_main

        return doctor_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_format)
        cfg = engine_config_from_args(args)
        check_device(args.device)
        args.registration_key = args.registration_key or _env_registration_key()
        tokenizer = frontend_tokenizer(cfg.model.model, cfg.model.tokenizer,
                                       chat_template=cfg.model.chat_template,
                                       trust_remote_code=cfg.model.trust_remote_code)
    except ConfigError as exc:
        print(f"disagg: error: {exc}", file=sys.stderr)
        return 2
    from disagg.server.server_main import serve

    export_to_children(args.log_level, args.log_format)  # the engine cores log like us
    try:
        return asyncio.run(serve(cfg, args, tokenizer))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
