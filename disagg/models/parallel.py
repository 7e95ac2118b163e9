"""Megatron-style tensor parallelism: which shard each rank holds and the layers that use them.

Column-parallel layers split their output rows, so each rank computes a slice of the features
with no communication; the row-parallel layer after it splits its input columns to match and
sums the partial products over the group (one all-reduce per attention block and per MLP):

    x [T, hidden] --qkv / gate_up (column: local heads / local intermediate slice)-->
      local features --o_proj / down_proj (row: local columns)--> partial sum --all_reduce-->

The vocabulary is padded to a multiple of the TP size and split in rows: rank r owns token ids
[r * per, (r + 1) * per). The embedding looks up its own ids and all-reduces (the other ranks
add zeros); the LM head computes its logits slice and all-gathers them along the vocab dim.

With ``size == 1`` every layer here is exactly the plain ``nn.Linear`` / ``nn.Embedding`` it
subclasses: same parameter shapes, same kernels, no collective (unless its weight is fp8:
``LinearBase``, disagg/models/quant.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from disagg.common.config import ConfigError
from disagg.models.arch import ArchConfig


@dataclass(frozen=True)
class TPContext:
    """This rank's place in its tensor-parallel group and the group's collectives."""

    rank: int = 0
    """Rank in the TP group (0 .. size-1)."""
    size: int = 1
    """Ranks in the TP group."""
    group: Any = None
    """torch.distributed ProcessGroup of the collectives; None: the default group."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place; returns ``x``. No-op when size == 1."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' ``x`` along the last dim in rank order; no-op at size 1."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)


def kv_head_range(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """(first global KV head, number of KV heads) that ``rank`` holds.

    tp_size <= num_kv_heads: num_kv_heads // tp_size consecutive heads each. tp_size >
    num_kv_heads: one head each, replicated over tp_size // num_kv_heads consecutive ranks
    (2 heads, tp 4 -> ranks hold heads 0, 0, 1, 1), so every rank's query heads find their KV.
    """
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of {tp_size}")
    if tp_size <= num_kv_heads:
        per_rank = num_kv_heads // tp_size
        return rank * per_rank, per_rank
    return rank // (tp_size // num_kv_heads), 1


def check_tp(arch: ArchConfig, tp_size: int) -> None:
    """Raise ConfigError unless ``arch`` splits evenly over ``tp_size`` ranks."""
    heads, kv_heads = arch.num_heads, arch.num_kv_heads
    if tp_size < 1:
        raise ConfigError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    if heads % tp_size or (kv_heads % tp_size and tp_size % kv_heads):
        raise ConfigError(
            f"tensor_parallel_size {tp_size} does not split this model: it must divide "
            f"num_attention_heads ({heads}), and divide or be a multiple of "
            f"num_key_value_heads ({kv_heads})")
    moe = arch.moe
    split = {} if moe is not None and len(moe.layers) == arch.num_layers \
        else {"intermediate_size": arch.intermediate_size}  # a dense layer exists
    if moe is not None:
        split["moe_intermediate_size"] = moe.intermediate_size
        split["shared_expert_intermediate_size"] = moe.shared_intermediate_size
    for what, size in split.items():
        if size % tp_size:
            raise ConfigError(f"tensor_parallel_size {tp_size} does not split this model: "
                              f"it must divide {what} ({size})")


def vocab_rows_per_rank(vocab_size: int, tp_size: int) -> int:
    """Rows of the vocab-parallel embedding/LM head each rank owns (vocab padded up to tp)."""
    return -(-vocab_size // tp_size)


class FewRowsRoute:
    """A linear layer's route to the few-rows kernel (hip_kernels/skinny_gemm.py), set by
    ``route_skinny`` where the arch's config turns it on."""

    skinny: Callable[..., torch.Tensor] | None = None
    """The kernel for a plain weight; None: always the vendor BLAS."""
    skinny_rows: int = 0
    """Rows of x up to which ``skinny`` runs instead."""

    def takes_few_rows(self, x: torch.Tensor) -> bool:
        """Whether ``x`` (any leading dims) goes to ``skinny``: 1..skinny_rows rows."""
        return self.skinny is not None and 0 < x.numel() <= self.skinny_rows * x.shape[-1]


class LinearBase(FewRowsRoute, nn.Linear):
    """nn.Linear whose weight may be fp8: disagg/models/quant.py then sets ``quant`` and a
    ``weight_scale``. The LM head, embeddings and routers are plain nn.Linear: never fp8."""

    quant: Any = None
    """None: ``weight`` is in the model dtype; else the Fp8LinearMethod computing x W^T."""
    weight_scale: torch.Tensor
    """fp32 scales of an fp8 ``weight`` (a parameter only then)."""

    def _plain(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.skinny is not None and self.takes_few_rows(x):
            return self.skinny(x, self.weight, bias)
        return F.linear(x, self.weight, bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T without the bias."""
        return self._plain(x, None) if self.quant is None else self.quant.apply(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b."""
        if self.quant is None:
            return self._plain(x, self.bias)
        y = self.quant.apply(self, x)
        return y if self.bias is None else y + self.bias


def route_skinny(model: nn.Module, kernel: Callable[..., torch.Tensor], rows: int) -> int:
    """Send every plain (not fp8) LinearBase of ``model``, and its LM head, with at most
    ``rows`` rows of x to ``kernel``; returns how many layers (0 when ``rows`` is 0)."""
    if rows <= 0:
        return 0
    routed = 0
    for module in model.modules():
        fp8 = isinstance(module, LinearBase) and module.quant is not None
        if isinstance(module, FewRowsRoute) and not fp8:
            module.skinny, module.skinny_rows = kernel, rows
            routed += 1
    return routed


class ReplicatedLinear(LinearBase):
    """The whole y = x W^T (+ b) on every rank (MLA's projections, which TP does not split)."""


class ColumnParallelLinear(LinearBase):
    """y = x W_r^T (+ b_r) with W_r this rank's output rows; no communication.

    ``out_features`` is this rank's width (the caller knows how a fused layout splits, e.g.
    local q heads | local K heads | local V heads).
    """


class RowParallelLinear(LinearBase):
    """y = all_reduce(x_r W_r^T) (+ b) with W_r the input columns matching x_r's features.

    ``in_features`` is this rank's width. The bias is added once, after the reduce.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features of this rank] -> [..., out_features], summed over the group."""
        if self.tp.size == 1:
            return super().forward(x)
        y = self.tp.all_reduce(self.matmul(x))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Embedding whose rows [rank * per, (rank + 1) * per) of the padded vocab live here."""

    def __init__(self, vocab_size: int, embedding_dim: int, tp: TPContext) -> None:
        per_rank = vocab_rows_per_rank(vocab_size, tp.size)
        super().__init__(per_rank, embedding_dim)
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab_start = tp.rank * per_rank

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, dim]: own rows looked up, others zero, summed over the group."""
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(FewRowsRoute, nn.Linear):
    """LM head split in vocab rows like VocabParallelEmbedding (so tied weights can share)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPContext) -> None:
        super().__init__(hidden_size, vocab_rows_per_rank(vocab_size, tp.size), bias=False)
        self.tp = tp
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [n, hidden] -> logits [n, vocab_size] (all ranks get the full row); into
        ``out`` when given (the GEMM writes it directly where it can)."""
        if self.skinny is not None and self.takes_few_rows(hidden):
            logits = self.skinny(hidden, self.weight)
        elif out is not None and self.tp.size == 1 and out.dtype == hidden.dtype:
            return torch.mm(hidden, self.weight.t(), out=out)
        else:
            logits = F.linear(hidden, self.weight)
        if self.tp.size > 1:
            logits = self.tp.all_gather_last(logits)
            if logits.shape[-1] != self.vocab_size:  # drop the padding rows' logits
                logits = logits[..., :self.vocab_size].contiguous()
        return logits if out is None else out.copy_(logits)
