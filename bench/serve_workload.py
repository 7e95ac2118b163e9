"""What one ``disagg bench serve`` run sends: a probe, warm-ups and each point's request chains.

Independent datasets give every point the first ``num_prompts`` samples, one request per chain;
warm-ups are the last samples. ``multi-turn`` gives every point conversations of its own, so
the prefix cache one point filled cannot serve the next; the probe and the warm-ups are first
turns of extra conversations that no point sends.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from bench.client import RequestInput
from bench.datasets import SampleRequest, sample_conversations, sample_requests
from bench.load import RequestChain, SingleRequest
from bench.multi_turn import ConversationChain
from bench.serve_args import ServePlan, dataset_config
from disagg.common.tokenizer import Tokenizer

PROBE_OUTPUT_TOKENS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """Every request of a run, built before anything is sent (chains are used once)."""

    probe: RequestInput
    """One short request sent first to fail fast."""
    warmups: list[RequestInput]
    """Untimed, before every point."""
    points: list[list[RequestChain]]
    """The timed chains of each plan point, in plan order."""


def request_template(args: argparse.Namespace, plan: ServePlan) -> RequestInput:
    """The target, model, headers and extra body every request shares (empty prompt)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    headers.update(plan.headers or {})
    return RequestInput(api_url=args.base_url.rstrip("/") + args.endpoint,
                        model=args.served_model_name or args.model, prompt="", prompt_len=0,
                        output_len=0, extra_body=plan.extra_body, headers=headers or None)


def _input(template: RequestInput, sample: SampleRequest) -> RequestInput:
    return replace(template, prompt=sample.prompt, prompt_len=sample.prompt_len,
                   output_len=sample.expected_output_len)


def _short(req: RequestInput) -> RequestInput:
    return replace(req, output_len=min(PROBE_OUTPUT_TOKENS, req.output_len))


def _independent(args: argparse.Namespace, plan: ServePlan, template: RequestInput,
                 tokenizer: Tokenizer) -> Workload:
    num_samples = max(p.num_prompts for p in plan.points) + args.num_warmups
    samples = sample_requests(dataset_config(args, num_samples), tokenizer)
    inputs = [_input(template, s) for s in samples]
    warmups = inputs[len(inputs) - args.num_warmups:] if args.num_warmups else []
    return Workload(probe=_short(inputs[0]), warmups=warmups,
                    points=[[SingleRequest(req) for req in inputs[:p.num_prompts]]
                            for p in plan.points])


def _multi_turn(args: argparse.Namespace, plan: ServePlan, template: RequestInput,
                tokenizer: Tokenizer) -> Workload:
    turns = args.multi_turn_turns
    per_point = [p.num_prompts // turns for p in plan.points]
    num_extra = max(1, args.num_warmups)
    scripts = sample_conversations(
        dataset_config(args, (sum(per_point) + num_extra) * turns), tokenizer)
    chains = [ConversationChain(s, template, tokenizer) for s in scripts]
    extra_firsts = [c.first() for c in chains[len(chains) - num_extra:]]
    points: list[list[RequestChain]] = []
    start = 0
    for n in per_point:
        points.append(list(chains[start:start + n]))
        start += n
    return Workload(probe=_short(extra_firsts[0]), warmups=extra_firsts[:args.num_warmups],
                    points=points)


def build_workload(args: argparse.Namespace, plan: ServePlan,
                   tokenizer: Tokenizer) -> Workload:
    """The run's requests; raises ValueError for an impossible dataset."""
    template = request_template(args, plan)
    if args.dataset_name == "multi-turn":
        return _multi_turn(args, plan, template, tokenizer)
    return _independent(args, plan, template, tokenizer)
