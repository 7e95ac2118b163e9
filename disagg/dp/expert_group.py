"""The expert-parallel exchange among one instance's data-parallel ranks.

Built on the DP group's rendezvous store (its own key prefix, so its collectives never mix
with the lockstep all-reduce): gloo when the KV cache and model are on the CPU, NCCL (RCCL on
ROCm builds) on GPUs. Every call carries the deadline ``--dp-collective-timeout``; a failure
or a passed deadline raises ExpertExchangeError, after which the ranks no longer agree on
which collective comes next, so the engine core exits (disagg/dp/engine_process.py).

NCCL here is not exercised by CI (no multi-GPU machine); the gloo path runs in the CPU suite.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch

from disagg.models.expert_parallel import ExpertExchangeError


def _delta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


class ExpertGroup:
    """all-to-all among ``size`` ranks on ``device`` (cpu: gloo, cuda: NCCL/RCCL)."""

    def __init__(self, store: Any, rank: int, size: int, device: torch.device,
                 timeout_s: float) -> None:
        import torch.distributed as dist

        self.rank, self.size, self.device, self.timeout_s = rank, size, device, timeout_s
        self._dist: Any = dist
        self._pg: Any = None  # typed Any: torch's stubs lack alltoall_base
        prefixed = dist.PrefixStore("expert-parallel", store)
        try:
            if device.type == "cuda":
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = _delta(timeout_s)  # the NCCL watchdog aborts a late collective
                self._pg = dist.ProcessGroupNCCL(prefixed, rank, size, opts)
            else:
                self._pg = dist.ProcessGroupGloo(prefixed, rank, size, _delta(timeout_s))
        except Exception as exc:
            raise ExpertExchangeError(f"dp{rank}: cannot build the expert-parallel group of "
                                      f"{size} ranks on {device}: {exc}") from exc

    def exchange_counts(self, counts: list[int]) -> list[int]:
        """Send counts[j] to rank j; returns what each rank sent here."""
        inp = torch.tensor(counts, dtype=torch.int64, device=self.device)
        out = torch.empty_like(inp)
        self.all_to_all(out, inp, [1] * self.size, [1] * self.size)
        return [int(c) for c in out.tolist()]

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int],
                   in_splits: list[int]) -> None:
        """Rows of ``inp`` split by ``in_splits`` go to the ranks in order; ``out`` receives
        ``out_splits[r]`` rows from rank r. Bounded by the group's deadline."""
        opts = self._dist.AllToAllOptions()
        opts.timeout = _delta(self.timeout_s)
        try:
            self._pg.alltoall_base(out, inp, out_splits, in_splits, opts).wait()
        except Exception as exc:  # gloo/NCCL raise RuntimeError for peer loss and timeout
            raise ExpertExchangeError(f"dp{self.rank}: expert-parallel all-to-all among "
                                      f"{self.size} ranks failed (a peer rank died or hung): "
                                      f"{exc}") from exc

    def close(self) -> None:
        """Drop the group (peers see the connections close)."""
        self._pg = None
