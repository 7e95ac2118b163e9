"""Triton kernels for ROCm and CUDA, each beside a pure-torch reference with the same signature.

KV cache layout (the engine's one cache tensor, blocks outermost so that one block is one
contiguous byte run across all layers; transports move whole blocks with one descriptor):

    kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
                  |            |       |
                  |            |       +-- 0 = K, 1 = V
                  |            +-- per-layer view kv_cache[:, layer] -> "kv_layer"
                  +-- block stride = num_layers * 2 * block_size * num_kv_heads * head_dim

    kv_layer (what the attention kernels take): [num_blocks, 2, block_size, num_kv_heads, head_dim]
    with block stride = the full cache's block stride (not contiguous across blocks).

A token at position p of a sequence lives in block ``block_table[p // block_size]`` at offset
``p % block_size``; its slot is ``block_id * block_size + offset``.

Modules: one per kernel (``_<name>_kernel``, launcher ``<name>``, ``<name>_ref``), the
attention pair re-exported by ``paged_attention``; ``paged_mla_decode`` is DeepSeek's latent
attention decode (absorbed form) over the same cache with one KV head holding the latent's two
halves (K half = latent[:half], V half = latent[half:]) and ``mla_prefill_attention`` its
prompt steps over up-projected keys and values; ``fp8_gemm`` multiplies by fp8 weights with
128x128-block, per-row or per-tensor scales (DeepSeek-V3 checkpoints, ``--quantization fp8``);
``kv_fp8`` is the fp8 KV cache's
element format (per-layer K/V scales, saturating writes) that the cache writer and every
attention kernel share; ``moe_align`` sorts (token, k) pairs by
expert into BLOCK_M-row tiles (``MoeTiles``) and ``fused_moe`` runs the MoE MLP over them (the
gate_up and down grouped GEMMs, over bf16 or fp8 expert weights, and the combine over k);
``launch_config`` reads the per-arch
launch configs in ``configs/<arch>/``; ``aot`` compiles every kernel for gfx942 / gfx950 /
sm_90 without a GPU. The tolerance table and the interpreter-subprocess runner live beside the
tests, in ``tests/hip_kernels/kernel_testing.py``.
"""
