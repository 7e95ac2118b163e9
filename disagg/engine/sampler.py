"""Token selection: greedy, temperature, min-p, top-k, top-p, per-request seeds, logprobs; with
logit_bias and the repetition penalties applied first (disagg/engine/penalties.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from disagg.common.protocol import TokenLogprob
from disagg.common.sampling_params import SamplingParams
from disagg.engine.penalties import (
    TokenCounts,
    TokenHistory,
    apply_logit_bias,
    apply_penalties,
    ban_tokens,
    min_tokens_bans,
    to_device,
)


class Sampler:
    """Samples one token per row of logits, all rows at once on the logits' device.

    Random rows draw by the exponential race (``argmax(p / q)``, ``q ~ Exp(1)``), which samples
    exactly from ``p`` and needs no per-row multinomial or host sync: one ``tolist`` per step.
    A seeded request fills its own row of ``q`` from its own generator (reproducible whatever
    the batch); unseeded rows share one generator seeded from the engine's seed.

    Rows asking for logit_bias or penalties are processed on a copy of the logits (greedy rows
    too: vLLM applies them before the argmax); a batch where no row asks pays nothing for
    them. Logprobs are always those of the raw logits (vLLM's default ``raw_logprobs``).
    """

    def __init__(self, device: torch.device, default_seed: int,
                 argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.device = device
        self.default_seed = default_seed
        self._argmax = argmax if argmax is not None else (lambda x: x.argmax(dim=-1))
        """[n, V] -> [n] first index of each row's max (the GPU's greedy_argmax kernel)."""
        self._generators: dict[str, torch.Generator] = {}
        self._shared = torch.Generator(device=device).manual_seed(default_seed & 0x7FFFFFFF)
        self.token_counts = TokenCounts(device)
        """Output-token counts of the penalized requests (freed by ``forget``)."""

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator and token counts."""
        self._generators.pop(request_id, None)
        self.token_counts.forget(request_id)

    def skip_draw(self, request_id: str, seed: int, vocab_size: int) -> None:
        """Advance a seeded request's generator past one token's draw: the prefill made it
        (it sampled the first token), so the decode's next draw is the monolithic second."""
        gen = self._generator(request_id, seed)
        torch.empty(vocab_size, device=self.device).exponential_(generator=gen)

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, request_ids: list[str],
               params: list[SamplingParams],
               histories: Sequence[TokenHistory] | None = None,
               ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [n, V] fp32 -> (token ids, logprobs or None per row). ``histories``: each
        row's prompt and output token ids, needed when a row has penalties. Logits in a
        narrower dtype (a decode graph's output) are widened to fp32 first unless every row
        only takes the argmax (the same index either way: widening is exact)."""
        if logits.shape[0] == 0:
            return [], []
        if logits.dtype != torch.float32 and not all(_argmax_only(sp) for sp in params):
            logits = logits.float()
        processed = self._processed(logits, request_ids, params, histories)
        tokens = self._argmax(processed)
        random_rows = [i for i, sp in enumerate(params) if not sp.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            tokens[rows] = self._sample_random(processed[rows],
                                               [params[i] for i in random_rows],
                                               [request_ids[i] for i in random_rows])
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

    def _processed(self, logits: torch.Tensor, request_ids: list[str],
                   params: list[SamplingParams],
                   histories: Sequence[TokenHistory] | None) -> torch.Tensor:
        """``logits`` itself when no row has min_tokens to honour, logit_bias or penalties,
        else a copy where those rows have them applied (stop tokens banned below min_tokens,
        then bias, then penalties, as vLLM)."""
        biased = [i for i, sp in enumerate(params) if sp.logit_bias]
        penalized = [i for i, sp in enumerate(params) if sp.has_penalties]
        bans = [] if histories is None else [
            (i, banned) for i, sp in enumerate(params)
            if sp.min_tokens and (banned := min_tokens_bans(sp, histories[i]))]
        if not biased and not penalized and not bans:
            return logits
        out = logits.clone()
        if bans:
            ban_tokens(out, [i for i, _ in bans], [banned for _, banned in bans])
        if biased:
            apply_logit_bias(out, biased, [params[i].logit_bias for i in biased])
        if penalized:
            if histories is None:
                raise ValueError("penalties need each row's token history")
            self._penalize(out, penalized, [request_ids[i] for i in penalized],
                           [params[i] for i in penalized], [histories[i] for i in penalized])
        return out

    def _penalize(self, logits: torch.Tensor, rows: list[int], request_ids: list[str],
                  params: list[SamplingParams], histories: list[TokenHistory]) -> None:
        """Apply the penalties to ``rows`` of ``logits`` in place."""
        dev = logits.device
        counts, in_prompt = self.token_counts.gather(request_ids, histories, logits.shape[1])
        presence, frequency, repetition = torch.tensor(
            [[sp.presence_penalty for sp in params], [sp.frequency_penalty for sp in params],
             [sp.repetition_penalty for sp in params]], dtype=logits.dtype,
        ).to(dev, non_blocking=True)
        if len(rows) == logits.shape[0]:
            logits.copy_(apply_penalties(logits, counts, in_prompt, presence, frequency,
                                         repetition))
            return
        index = to_device(rows, torch.long, dev)
        logits[index] = apply_penalties(logits[index], counts, in_prompt, presence, frequency,
                                        repetition)

    def _sample_random(self, logits: torch.Tensor, params: list[SamplingParams],
                       request_ids: list[str]) -> torch.Tensor:
        """One token per row of ``logits`` [m, V] under each row's temperature/top-k/top-p."""
        m, vocab = logits.shape
        dev = logits.device
        temps = torch.tensor([max(sp.temperature, 1e-5) for sp in params], device=dev)
        scaled = logits / temps[:, None]
        if any(sp.min_p > 0.0 for sp in params):
            scaled = _min_p(scaled, to_device([sp.min_p for sp in params], scaled.dtype, dev))
        top_k = [sp.top_k if 0 < sp.top_k < vocab else vocab for sp in params]
        top_p = [sp.top_p for sp in params]
        if min(top_k) < vocab or min(top_p) < 1.0:
            ordered, order = scaled.sort(dim=-1, descending=True)
            if min(top_k) < vocab:
                ranks = torch.arange(vocab, device=dev)[None, :]
                ordered.masked_fill_(ranks >= torch.tensor(top_k, device=dev)[:, None],
                                     float("-inf"))
            if min(top_p) < 1.0:
                probs = torch.softmax(ordered, dim=-1)
                # keep the smallest prefix whose mass reaches top_p (the top token always stays)
                drop = probs.cumsum(dim=-1) - probs > torch.tensor(top_p, device=dev)[:, None]
                ordered.masked_fill_(drop, float("-inf"))
            scaled = torch.empty_like(scaled).scatter_(1, order, ordered)
        probs = torch.softmax(scaled, dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self._shared)
        for row, (sp, rid) in enumerate(zip(params, request_ids, strict=True)):
            if sp.seed is not None:
                race[row].exponential_(generator=self._generator(rid, sp.seed))
        # Exp(1) can round to 0; then a zero-probability token would give 0/0 = NaN and win.
        return (probs / race.clamp_min_(torch.finfo(race.dtype).tiny)).argmax(dim=-1)


def _argmax_only(sp: SamplingParams) -> bool:
    """Whether a row's token is the plain argmax of its logits: greedy, no logprobs, nothing
    that edits logits (bias, penalties, min_tokens bans)."""
    return (sp.greedy and sp.logprobs is None and not sp.logit_bias and not sp.has_penalties
            and not sp.min_tokens)


def _min_p(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop (to -inf) each row's tokens whose probability is below ``min_p`` [m] times the row's
    top probability; a row with min_p 0 keeps every token."""
    probs = torch.softmax(scaled, dim=-1)
    floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return scaled.masked_fill(probs < floor, float("-inf"))
