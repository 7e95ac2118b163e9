"""The mixture-of-experts MLP: route each token to its top-k experts, run them as one fused
grouped GEMM, add the shared expert(s).

    x [T, H] --gate--> logits [T, E] --select_experts--> weights [T, k] fp32, ids [T, k]
      --ops.fused_moe(x, w13, w2, weights, local ids)--> routed [T, H]
      + shared expert(x) (x sigmoid(x . w) on Qwen2-MoE)            --all-reduce over TP-->

Experts are stacked: ``w13`` [E, 2I, H] holds each expert's [gate | up] rows and ``w2``
[E, H, I] its down projection (the loader stacks Hugging Face's per-expert tensors into them).
Under tensor parallelism every rank holds every expert's slice of the intermediate features
(like the dense MLP) and one all-reduce sums routed and shared parts. Under expert parallelism
(``EPContext``, disagg/models/expert_parallel.py) a rank holds a contiguous range of whole
experts and the token exchange happens inside ``EPContext.run`` (which calls this rank's
experts, scales included, through ``SparseMoeBlock._local_experts``). With fp8 weights
(disagg/models/quant.py) w13 and w2 stay fp8 in memory with fp32 scales ``w13_scale`` /
``w2_scale`` [E, Sn, Sk] that ops.fused_moe reads (layouts: hip_kernels/fused_moe.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disagg.common.config import ConfigError
from disagg.models.arch import ArchConfig, MoEArch
from disagg.models.expert_parallel import EPContext
from disagg.models.ops import Ops
from disagg.models.parallel import ColumnParallelLinear, RowParallelLinear, TPContext
from hip_kernels.fp8_gemm import FP8_DTYPES


def select_experts(logits: torch.Tensor, moe: MoEArch,
                   correction_bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] fp32, global expert ids [T, k] int64)."""
    logits = logits.float()
    scores = logits.sigmoid() if moe.scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if moe.topk_method != "greedy":
        per_group = moe.num_experts // moe.n_group
        grouped = choice.view(-1, moe.n_group, per_group)
        if moe.topk_method == "noaux_tc":
            group_scores = grouped.topk(min(2, per_group), dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        best = group_scores.topk(moe.topk_group, dim=-1)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        fill = float("-inf") if moe.topk_method == "noaux_tc" else 0.0
        choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), fill)
    ids = choice.topk(moe.top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if moe.renormalize:  # top-1 too: its weight becomes 1 (as Mixtral's and Qwen's code)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * moe.routed_scaling_factor, ids


class FusedExperts(nn.Module):
    """This rank's experts, stacked: w13 [E_local, 2I_local, H], w2 [E_local, H, I_local].

    fp8 stacks (disagg/models/quant.py sets them up) also hold fp32 ``w13_scale`` and
    ``w2_scale``; None otherwise. While a checkpoint loads, w13_scale is [E, 2R, Sk]: R rows
    for gate, then R for up (R = I_local / 128 with block scales, 1 with per-tensor ones).
    """

    w13_scale: torch.Tensor | None
    w2_scale: torch.Tensor | None

    def __init__(self, num_local: int, hidden: int, inter: int, tp: TPContext) -> None:
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * inter, hidden))
        self.w2 = nn.Parameter(torch.empty(num_local, hidden, inter))
        self.register_parameter("w13_scale", None)
        self.register_parameter("w2_scale", None)
        self.intermediate_size = inter
        self.tp = tp

    def load_shard(self, param: str, which: str, local: int, full: torch.Tensor) -> None:
        """Copy this rank's part of one checkpoint tensor of local expert ``local``: ``param``
        w13 | w2 | w13_scale | w2_scale, ``which`` gate | up | down. gate / up fill the first /
        second half of the rows with the rank's slice of the full rows; down fills all rows
        with the rank's slice of the full columns; a one-element (per-tensor) scale fits all."""
        target = getattr(self, param).data[local]
        if which != "down":
            half = target.shape[0] // 2
            target = target[:half] if which == "gate" else target[half:]
        is_scale = param.endswith("_scale")
        if is_scale and full.numel() == 1:
            part = full.reshape(1, 1)
        else:
            part = self._rank_part(which, full, tuple(target.shape))
        if not is_scale and (target.dtype in FP8_DTYPES) != (part.dtype in FP8_DTYPES):
            raise ConfigError(f"routed expert {which} weights are {part.dtype} in the "
                              f"checkpoint but {target.dtype} here: an fp8 checkpoint must "
                              "quantize every routed expert")
        with torch.no_grad():
            target.copy_(part)

    def _rank_part(self, which: str, full: torch.Tensor, shape: tuple[int, ...]
                   ) -> torch.Tensor:
        """Rows (gate, up) or columns (down) [rank * n, (rank + 1) * n) of ``full`` for a
        ``shape`` target; a ConfigError unless the full tensor is tp.size such parts."""
        dim = 1 if which == "down" else 0
        expected = list(shape)
        expected[dim] *= self.tp.size
        if full.dim() != 2 or list(full.shape) != expected:
            raise ConfigError(f"routed expert {which} tensor {tuple(full.shape)} does not "
                              f"match {tuple(expected)} (this model's expert shape)")
        return full.narrow(dim, self.tp.rank * shape[dim], shape[dim])


class SharedExpert(nn.Module):
    """The always-on expert: a gated SiLU MLP whose partial sum the MoE block reduces."""

    def __init__(self, hidden: int, inter: int, ops: Ops) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, 2 * inter, bias=False)
        self.down_proj = RowParallelLinear(inter, hidden, bias=False, tp=TPContext())
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> this rank's partial [T, H] (not reduced)."""
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """Router, routed experts and shared expert of one MoE layer (this rank's part)."""

    def __init__(self, arch: ArchConfig, ops: Ops, tp: TPContext, ep: EPContext) -> None:
        super().__init__()
        moe = arch.moe
        assert moe is not None
        self.moe, self.ops, self.tp, self.ep = moe, ops, tp, ep
        self.gate = nn.Linear(arch.hidden_size, moe.num_experts, bias=False)
        if moe.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(moe.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.expert_start, num_local = ep.expert_range(moe.num_experts)
        self.experts = FusedExperts(num_local, arch.hidden_size,
                                    moe.intermediate_size // tp.size, tp)
        self.shared_expert = SharedExpert(arch.hidden_size, moe.shared_intermediate_size
                                          // tp.size, ops) \
            if moe.shared_intermediate_size else None
        self.shared_expert_gate = nn.Linear(arch.hidden_size, 1, bias=False) \
            if moe.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        logits = F.linear(x, self.gate.weight)
        weights, ids = select_experts(logits, self.moe, self.e_score_correction_bias)
        out = self.ep.run(x, weights, ids, self._local_experts, self.experts.w13.shape[0])
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return self.tp.all_reduce(out)

    def load_expert(self, param: str, which: str, index: int, full: torch.Tensor) -> None:
        """Load a checkpoint tensor of global expert ``index`` (``FusedExperts.load_shard``);
        skipped when another expert-parallel rank holds that expert."""
        local = index - self.expert_start
        if 0 <= local < self.experts.w13.shape[0]:
            self.experts.load_shard(param, which, local, full)

    def _local_experts(self, x: torch.Tensor, weights: torch.Tensor,
                       local_ids: torch.Tensor) -> torch.Tensor:
        """Run this rank's experts: ids are local, those outside [0, E_local) skipped."""
        e = self.experts
        return self.ops.fused_moe(x, e.w13, e.w2, weights, local_ids, e.w13_scale, e.w2_scale)
