"""The vendor BLAS choice per token count (hip_kernels/vendor_blas.py): the arch's ranges,
set around one whole forward and restored after it, even when the forward raises."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch

from disagg.models.layers import AttentionMetadata
from disagg.models.llama import LlamaForCausalLM
from disagg.models.loader import resolve_arch
from disagg.models.ops import select_ops
from hip_kernels.launch_config import KNOWN_ARCHS, OVERRIDE_ENV
from hip_kernels.vendor_blas import lt_rows, prefer_lt


class FakePreference:
    """torch.backends.cuda.preferred_blas_library without a CUDA build: a getter with no
    argument, a setter taking a name or a value the getter returned."""

    def __init__(self) -> None:
        self.current = "cublas"
        self.sets: list[str] = []

    def __call__(self, backend: str | None = None) -> str:
        if backend is not None:
            assert backend in ("cublas", "cublaslt")
            self.current = backend
            self.sets.append(backend)
        return self.current


@pytest.fixture
def preference(monkeypatch):
    fake = FakePreference()
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", fake)
    return fake


def test_outside_every_range_nothing_is_touched(preference):
    with prefer_lt(16, ((17, 64),)):
        assert preference.current == "cublas"
    assert preference.sets == []


@pytest.mark.parametrize("rows", (17, 40, 64))
def test_inside_a_range_lt_is_preferred_then_restored(preference, rows):
    with prefer_lt(rows, ((1, 1), (17, 64))):
        assert preference.current == "cublaslt"
    assert preference.current == "cublas"


def test_restored_when_the_block_raises(preference):
    with pytest.raises(RuntimeError, match="boom"), prefer_lt(32, ((17, 64),)):
        raise RuntimeError("boom")
    assert preference.current == "cublas"


@pytest.mark.parametrize("arch", ("default", *KNOWN_ARCHS))
def test_every_arch_config_is_a_list_of_ranges(arch):
    for lo, hi in lt_rows(arch):
        assert 0 < lo <= hi


@pytest.mark.parametrize("bad", ([[0, 4]], [[8, 4]], [[4]], "17-64", [[1.5, 4]]))
def test_a_malformed_range_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv(OVERRIDE_ENV, json.dumps({"vendor_blas": {"lt_rows": bad}}))
    with pytest.raises(ValueError, match="lt_rows"):
        lt_rows("default")


def test_cpu_ops_never_ask_for_lt():
    assert select_ops("cpu").lt_rows == ()


def test_the_forward_runs_its_linears_under_its_token_count_choice(preference):
    """Every projection of a 3-token forward sees Lt (3 is in range); a 1-token one does not;
    the process-wide preference is back to the default after each."""
    ops = dataclasses.replace(select_ops("cpu"), lt_rows=((2, 4),))
    model = LlamaForCausalLM(resolve_arch("builtin:tiny-llama"), ops, 64).eval()
    seen: list[str] = []
    for layer in model.layers:
        block: Any = layer
        attn_proj = block.self_attn.qkv_proj
        mlp_proj = block.mlp.down_proj
        for proj in (attn_proj, mlp_proj):
            proj.register_forward_pre_hook(lambda *_: seen.append(preference.current))
    a = model.arch
    for tokens, expected in ((3, "cublaslt"), (1, "cublas")):
        seen.clear()
        cache = torch.zeros(2, a.num_layers, 2, 4, a.num_kv_heads, a.head_dim)
        attn = AttentionMetadata(
            slot_mapping=torch.arange(tokens), block_tables=torch.tensor([[0, 1]],
                                                                          dtype=torch.int32),
            seq_lens=torch.tensor([tokens], dtype=torch.int32),
            query_start_loc=torch.tensor([0, tokens], dtype=torch.int32), decode_only=False)
        with torch.inference_mode():
            model(torch.arange(tokens), torch.arange(tokens), attn, cache)
        assert seen == [expected] * (2 * a.num_layers)
        assert preference.current == "cublas"
