"""Token selection: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

import torch

from disagg.protocol import TokenLogprob
from disagg.sampling_params import SamplingParams


class Sampler:
    """Samples one token per row of logits. Keeps a torch.Generator per seeded request."""

    def __init__(self, device: torch.device, default_seed: int) -> None:
        self.device = device
        self.default_seed = default_seed
        self._generators: dict[str, torch.Generator] = {}
        self._counter = 0

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, sp: SamplingParams) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            seed = sp.seed
            if seed is None:
                self._counter += 1
                seed = hash((self.default_seed, self._counter)) & 0x7FFFFFFF
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, request_ids: list[str],
               params: list[SamplingParams]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [n, V] fp32 -> (token ids, logprobs or None per row)."""
        if logits.shape[0] == 0:
            return [], []
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, sp in enumerate(params) if not sp.greedy]
        for i in random_rows:
            tokens[i] = self._sample_row(logits[i], params[i], request_ids[i])
        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(params)
        want = [i for i, sp in enumerate(params) if sp.logprobs is not None]
        if want:
            lp = torch.log_softmax(logits[want], dim=-1)
            for row, i in enumerate(want):
                k = params[i].logprobs or 0
                top_v, top_i = lp[row].topk(k) if k else (lp[row][:0], lp[row][:0].long())
                logprobs[i] = TokenLogprob(float(lp[row, token_list[i]]),
                                           list(zip(top_i.tolist(), top_v.tolist(), strict=False)))
        return token_list, logprobs

    def _sample_row(self, logits: torch.Tensor, sp: SamplingParams, request_id: str) -> int:
        scaled = logits / max(sp.temperature, 1e-5)
        if sp.top_k > 0 and sp.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, sp.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if sp.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            cum = sorted_p.cumsum(0)
            drop = cum - sorted_p > sp.top_p  # keep the smallest prefix reaching top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        gen = self._generator(request_id, sp)
        return int(torch.multinomial(probs, 1, generator=gen).item())
