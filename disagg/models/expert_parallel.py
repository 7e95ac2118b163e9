"""Expert parallelism: each rank of the EP group (the instance's data-parallel ranks) holds a
contiguous range of whole experts, and every MoE layer exchanges tokens with all-to-all.

One MoE layer on one rank (T tokens, top-k, P = T * k (token, expert) pairs):

    dest[p]      = the rank holding pair p's expert          pairs sorted by dest
    counts       --all_to_all-->  how many pairs each rank will send here
    x rows, ids  --all_to_all-->  the pairs this rank's experts must run (local expert ids)
    run local experts on them (weight 1 each)
    outputs      --all_to_all-->  back to the ranks the pairs came from (reverse splits)
    out[t]       = sum_k weight[t, k] * output of pair (t, k)            (fp32, then x.dtype)

Every rank calls the same collectives in the same order in every step: attention stays data
parallel, so a rank with no tokens (a lockstep dummy step) still joins with zero pairs
(``LlamaForCausalLM.idle_moe_pass``). The exchange (``ExpertExchange``) is built by the layer
that owns the processes (disagg/dp/expert_group.py): gloo on CPU, NCCL/RCCL on GPU, each call
with a deadline; a failed or late exchange raises ``ExpertExchangeError`` and the engine core
exits (the group is out of step for good).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from disagg.common.config import ConfigError

LocalExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x [R, H], weights [R, k] fp32, local ids [R, k]) -> [R, H]: this rank's experts."""


class ExpertExchangeError(RuntimeError):
    """An all-to-all among the EP ranks failed or passed its deadline."""


class ExpertExchange(Protocol):
    """The collectives expert parallelism needs (one all-to-all, in two shapes)."""

    def exchange_counts(self, counts: list[int]) -> list[int]:
        """Send ``counts[j]`` to rank j; returns what each rank sent here, in rank order."""
        ...

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int],
                   in_splits: list[int]) -> None:
        """Rank r's rows ``inp[sum(in_splits[:j]) : +in_splits[j]]`` land in rank j's ``out``
        at ``sum(out_splits[:r])`` (rows along dim 0); raises ExpertExchangeError."""
        ...


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """(first global expert, number of experts) on ``ep_rank``; they must split evenly."""
    if num_experts % ep_size:
        raise ConfigError(f"expert parallelism over {ep_size} ranks needs the number of "
                          f"experts ({num_experts}) to be a multiple of {ep_size}")
    per_rank = num_experts // ep_size
    return ep_rank * per_rank, per_rank


@dataclass(frozen=True)
class EPContext:
    """This rank's place in the expert-parallel group; size 1: every expert is local."""

    rank: int = 0
    size: int = 1
    exchange: ExpertExchange | None = None

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """(first global expert, number of experts) held here."""
        return expert_range(num_experts, self.size, self.rank)

    def run(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
            experts: LocalExperts, num_local: int) -> torch.Tensor:
        """Routed output [T, H] of x [T, H] for its top-k (weights, global ids) [T, k];
        ``experts`` runs the ``num_local`` experts held here."""
        if self.size == 1:
            return experts(x, weights, ids)
        assert self.exchange is not None
        num_tokens, top_k = ids.shape
        pairs_ids = ids.reshape(-1)
        per_rank = num_local
        dest = torch.div(pairs_ids, per_rank, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        in_splits = torch.bincount(dest, minlength=self.size).tolist()
        out_splits = self.exchange.exchange_counts(in_splits)
        token_of_pair = order // top_k
        send_x = x.index_select(0, token_of_pair)
        send_ids = (pairs_ids.index_select(0, order) - dest.index_select(0, order) * per_rank)
        recv_x = x.new_empty((sum(out_splits), x.shape[1]))
        recv_ids = send_ids.new_empty((sum(out_splits),))
        self.exchange.all_to_all(recv_x, send_x.contiguous(), out_splits, in_splits)
        self.exchange.all_to_all(recv_ids, send_ids.contiguous(), out_splits, in_splits)
        ones = torch.ones((recv_ids.shape[0], 1), dtype=torch.float32, device=x.device)
        done = experts(recv_x, ones, recv_ids.unsqueeze(1))
        back = x.new_empty((pairs_ids.shape[0], x.shape[1]))
        self.exchange.all_to_all(back, done.contiguous(), in_splits, out_splits)
        per_pair = torch.empty_like(back)
        per_pair.index_copy_(0, order, back)
        per_pair = per_pair.view(num_tokens, top_k, x.shape[1])
        out = (per_pair.float() * weights.unsqueeze(-1)).sum(1)
        return out.to(x.dtype)

