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
experts and the token exchange happens inside ``EPContext.run``. With fp8 weights
(disagg/models/quant.py) the shared expert is fp8 but the routed experts are not: fused_moe
takes no fp8 weights, so an fp8 checkpoint's experts are dequantized to the model dtype at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disagg.models.arch import ArchConfig, MoEArch
from disagg.models.expert_parallel import EPContext
from disagg.models.ops import Ops
from disagg.models.parallel import ColumnParallelLinear, RowParallelLinear, TPContext


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
    if moe.renormalize and moe.top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * moe.routed_scaling_factor, ids


class FusedExperts(nn.Module):
    """This rank's experts, stacked: w13 [E_local, 2I_local, H], w2 [E_local, H, I_local]."""

    def __init__(self, num_local: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * inter, hidden))
        self.w2 = nn.Parameter(torch.empty(num_local, hidden, inter))
        self.intermediate_size = inter


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
                                    moe.intermediate_size // tp.size)
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

    def _local_experts(self, x: torch.Tensor, weights: torch.Tensor,
                       local_ids: torch.Tensor) -> torch.Tensor:
        """Run this rank's experts: ids are local, those outside [0, E_local) skipped."""
        return self.ops.fused_moe(x, self.experts.w13, self.experts.w2, weights, local_ids)
