"""disagg: ROCm-first disaggregated prefill/decode LLM serving.

Rooms, lowest layer first (imports only go down; tests/test_layers.py checks it):

    disagg/common   leaf: config, env variables, platform facts, the wire types every process
                    shares (frontend <-> engine protocol, kv_transfer_params, OpenAI bodies,
                    SSE framing), tokenizer, pause states
    hip_kernels     Triton kernels and their torch references (torch, triton, disagg.common)
    disagg/models   model architectures, weight loading, layer ops
    disagg/engine   engine core: scheduler, block pool, KV sizing, model runner, sampler,
                    graphs, and the KV connector interface it calls
    connectors      KV connector implementations (P/D connector, transports)
    disagg/dp       the engine-core process: data-parallel group, lockstep, RPC, balancing
    disagg/server   the instance's frontend: engine client, OpenAI API server, metrics
    proxy           the P/D proxy (talks to instances only through disagg.common wire types)
    disagg (top), bench   tools: the ``disagg`` CLI, demo, doctor, offline LLM, benchmarks
"""

from disagg.common.version import __version__

__all__ = ["__version__"]
