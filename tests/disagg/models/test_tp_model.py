"""Tensor-parallel Llama on CPU (gloo): TP 2 and 4 give the logits, tokens and KV of TP 1."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from support import free_port

from disagg.common.config import ConfigError, ModelConfig
from disagg.models.arch import ArchConfig, arch_from_hf_dict
from disagg.models.builtin import builtin_hf_config, seeded_hf_state_dict
from disagg.models.layers import AttentionMetadata
from disagg.models.llama import LlamaForCausalLM
from disagg.models.loader import _expected_loads, hf_param_shapes, load_model, resolve_arch
from disagg.models.ops import select_ops
from disagg.models.parallel import TPContext, check_tp, kv_head_range

MODEL = "builtin:tiny-llama"
BLOCK_SIZE = 4
MAX_BLOCKS = 6
DECODE_STEPS = 3
PROMPTS = [[5, 77, 200, 31, 9], [250, 3, 101, 17, 64, 88, 300, 12, 45, 150, 8]]
TIED_VOCAB = 317
"""Not a multiple of 2 or 4: the vocab-parallel layers carry padding rows."""
CHILD_TIMEOUT_S = 60.0


def tied_arch() -> ArchConfig:
    """tiny-llama with tied embeddings, an odd vocabulary and biases on q/k/v/o and the
    MLP (column-parallel biases are sliced, row-parallel ones added once after the reduce)."""
    cfg = builtin_hf_config(MODEL)
    cfg.update(tie_word_embeddings=True, vocab_size=TIED_VOCAB, attention_bias=True,
               mlp_bias=True)
    return arch_from_hf_dict(cfg)


def build(tied: bool, tp: TPContext) -> LlamaForCausalLM:
    """This rank's fp32 CPU model, its weights sharded from the full checkpoint."""
    ops = select_ops("cpu")
    if not tied:
        cfg = ModelConfig(model=MODEL, served_model_name="tiny")
        return load_model(cfg, resolve_arch(MODEL), ops, torch.device("cpu"), torch.float32,
                          64, tp)
    arch = tied_arch()
    model = LlamaForCausalLM(arch, ops, 64, tp)
    loaded = model.load_weights(seeded_hf_state_dict(0, hf_param_shapes(arch)).items())
    assert loaded == _expected_loads(arch)
    return model.eval()


@torch.inference_mode()
def run_greedy(model: LlamaForCausalLM) -> dict[str, Any]:
    """Prefill PROMPTS, then DECODE_STEPS greedy decode steps over a paged cache."""
    a = model.arch
    num_seqs = len(PROMPTS)
    cache = torch.zeros(num_seqs * MAX_BLOCKS, a.num_layers, 2, BLOCK_SIZE,
                        model.num_local_kv_heads, a.head_dim)
    tables = torch.arange(num_seqs * MAX_BLOCKS, dtype=torch.int32).view(num_seqs, MAX_BLOCKS)
    seqs = [list(p) for p in PROMPTS]
    cached = [0] * num_seqs
    step_logits = []
    for step in range(1 + DECODE_STEPS):
        ids, positions, slots, qsl = [], [], [], [0]
        for i, seq in enumerate(seqs):
            for pos in range(cached[i], len(seq)):
                ids.append(seq[pos])
                positions.append(pos)
                slots.append(int(tables[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
            qsl.append(len(ids))
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots), block_tables=tables,
            seq_lens=torch.tensor([len(s) for s in seqs], dtype=torch.int32),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32), decode_only=step > 0)
        hidden = model(torch.tensor(ids), torch.tensor(positions), attn, cache)
        logits = model.compute_logits(hidden[torch.tensor(qsl[1:]) - 1])
        step_logits.append(logits)
        for i, seq in enumerate(seqs):
            cached[i] = len(seq)
            seq.append(int(logits[i].argmax()))
    return {"logits": torch.stack(step_logits), "tokens": seqs, "cache": cache,
            "kv_head_start": model.kv_head_start, "num_local_kv_heads": model.num_local_kv_heads}


def _tp_child(rank: int, port: int, out_dir: str) -> None:
    """One of 4 ranks: TP 2 on ranks 0-1 (a subgroup), then TP 4 on all (default group)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=4,
                            rank=rank, timeout=timedelta(seconds=CHILD_TIMEOUT_S))
    try:
        pair = dist.new_group([0, 1])
        results = {}
        for tied in (False, True):
            if rank < 2:
                results[(tied, 2)] = run_greedy(build(tied, TPContext(rank, 2, pair)))
            results[(tied, 4)] = run_greedy(build(tied, TPContext(rank, 4)))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[bool, int], list[Any]]:
    """{(tied, tp_size): per-rank results}; TP 1 computed here while the ranks run."""
    out_dir = tmp_path_factory.mktemp("tp")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_tp_child, args=(r, port, str(out_dir)), daemon=True)
             for r in range(4)]
    try:
        for p in procs:
            p.start()
        out: dict[tuple[bool, int], list[Any]] = {
            (tied, 1): [run_greedy(build(tied, TPContext()))] for tied in (False, True)}
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        assert [p.exitcode for p in procs] == [0] * 4, "a TP rank failed or hung"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(4)]
    for tied in (False, True):
        out[(tied, 2)] = [ranks[r][(tied, 2)] for r in range(2)]
        out[(tied, 4)] = [ranks[r][(tied, 4)] for r in range(4)]
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_matches_tp1(runs: dict[tuple[bool, int], list[Any]], tp_size: int,
                        tied: bool) -> None:
    ref = runs[(tied, 1)][0]
    for rank, got in enumerate(runs[(tied, tp_size)]):
        assert got["tokens"] == ref["tokens"], f"rank {rank}"
        torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-4, rtol=1e-5)
        start, n = got["kv_head_start"], got["num_local_kv_heads"]
        assert (start, n) == kv_head_range(2, tp_size, rank)
        assert got["cache"].shape[-2] == n
        torch.testing.assert_close(got["cache"], ref["cache"][..., start:start + n, :],
                                   atol=1e-5, rtol=1e-5)


def test_tp1_is_the_plain_model() -> None:
    model = build(False, TPContext())
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["embed_tokens.weight"] == (320, 128)
    assert shapes["lm_head.weight"] == (320, 128)
    assert shapes["layers.0.self_attn.qkv_proj.weight"] == (4 * 32 + 2 * 2 * 32, 128)
    assert shapes["layers.0.self_attn.o_proj.weight"] == (128, 128)
    assert shapes["layers.0.mlp.gate_up_proj.weight"] == (768, 128)
    assert shapes["layers.0.mlp.down_proj.weight"] == (128, 384)
    assert (model.kv_head_start, model.num_local_kv_heads) == (0, 2)
    x = torch.randn(3, 5)
    assert TPContext().all_reduce(x) is x and TPContext().all_gather_last(x) is x


def test_tied_shard_shares_weight_and_zero_pads() -> None:
    model = build(True, TPContext(rank=3, size=4))  # collectives unused: no forward here
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.embed_tokens.weight.shape == (80, 128)  # 317 padded to 320, 80 rows each
    full = seeded_hf_state_dict(0, hf_param_shapes(tied_arch()))["model.embed_tokens.weight"]
    torch.testing.assert_close(model.embed_tokens.weight[:77], full[240:])
    assert not model.embed_tokens.weight[77:].any()
    weights = seeded_hf_state_dict(0, hf_param_shapes(tied_arch()))
    layer: Any = model.layers[0]
    mlp, attn = layer.mlp, layer.self_attn
    gate, up = (weights[f"model.layers.0.mlp.{p}_proj.bias"] for p in ("gate", "up"))
    torch.testing.assert_close(mlp.gate_up_proj.bias, torch.cat([gate[288:], up[288:]]))
    torch.testing.assert_close(mlp.down_proj.bias, weights["model.layers.0.mlp.down_proj.bias"])
    torch.testing.assert_close(attn.o_proj.bias, weights["model.layers.0.self_attn.o_proj.bias"])


@pytest.mark.parametrize("num_kv_heads, tp_size, expected", [
    (2, 1, [(0, 2)]),
    (2, 2, [(0, 1), (1, 1)]),
    (8, 4, [(0, 2), (2, 2), (4, 2), (6, 2)]),
    (2, 4, [(0, 1), (0, 1), (1, 1), (1, 1)]),
    (1, 4, [(0, 1)] * 4),
    (4, 8, [(0, 1), (0, 1), (1, 1), (1, 1), (2, 1), (2, 1), (3, 1), (3, 1)]),
])
def test_kv_head_range(num_kv_heads: int, tp_size: int,
                       expected: list[tuple[int, int]]) -> None:
    assert [kv_head_range(num_kv_heads, tp_size, r) for r in range(tp_size)] == expected


def test_kv_head_range_rejects_a_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank 4"):
        kv_head_range(2, 4, 4)


def test_check_tp() -> None:
    arch = resolve_arch(MODEL)  # 4 heads, 2 KV heads, intermediate 384
    for ok in (1, 2, 4):
        check_tp(arch, ok)
    for bad, needle in ((0, ">= 1"), (3, "num_attention_heads \\(4\\)"), (8, "tensor_parallel")):
        with pytest.raises(ConfigError, match=needle):
            check_tp(arch, bad)
    odd_kv = dataclasses.replace(arch, num_heads=12, num_kv_heads=3)
    with pytest.raises(ConfigError, match="num_key_value_heads \\(3\\)"):
        check_tp(odd_kv, 2)
    odd_inter = dataclasses.replace(arch, intermediate_size=382)
    with pytest.raises(ConfigError, match="intermediate_size \\(382\\)"):
        check_tp(odd_inter, 4)
