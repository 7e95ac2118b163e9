"""An instance's request metrics on prometheus_client, in a registry of its own (several apps
live in one test process, so the global default registry is never used).

Each observation feeds two families: the ``disagg_*`` series this project has always exposed
(tests, ``bench/instance_metrics.py`` and deploy scripts read them) and the series a vLLM
Grafana dashboard reads (``vllm:*``, labelled ``model_name``, with vLLM's buckets). The
engine's gauges are read at scrape time (disagg/server/metrics_render.py).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from disagg.common.timings import INSTANCE_PHASES, InstanceTimings
from disagg.engine.request import FINISH_REASONS

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""The ``disagg_*`` latency histograms' buckets."""
VLLM_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                       2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                      0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
"""vLLM's, plus four below 10 ms: a decode step here takes 5-20 ms on one GPU."""
VLLM_REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                          50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
"""vLLM's request-latency buckets (e2e, decode time)."""
VLLM_PHASE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2,
                        *VLLM_REQUEST_BUCKETS_S)
"""Queue and prefill time: vLLM's request buckets start at 0.3 s, where most of these end."""


def _histogram(name: str, doc: str, buckets: tuple[float, ...], registry: CollectorRegistry,
               labels: tuple[str, ...] = ()) -> Histogram:
    return Histogram(name, doc, labels, buckets=buckets, registry=registry)


class ServerMetrics:
    """Request-level metrics of one instance (its ``/metrics`` page's registry)."""

    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.registry = reg = CollectorRegistry()
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        self._success = Counter("disagg_request_success_total", "Finished requests by reason",
                                ("finished_reason",), registry=reg)
        self._prompt_tokens = Counter("disagg_prompt_tokens_total", "Prefill tokens",
                                      registry=reg)
        self._generation_tokens = Counter("disagg_generation_tokens_total", "Generated tokens",
                                          registry=reg)
        self._ttft = _histogram("disagg_time_to_first_token_seconds", "Time to first token",
                                LATENCY_BUCKETS_S, reg)
        self._tpot = _histogram("disagg_time_per_output_token_seconds",
                                "Time per output token after the first", LATENCY_BUCKETS_S, reg)
        self._e2e = _histogram("disagg_e2e_request_latency_seconds",
                               "End-to-end request latency", LATENCY_BUCKETS_S, reg)
        self._phases = _histogram(
            "disagg_request_phase_seconds", "Time to first token by phase: queue (received -> "
            "first scheduled), compute (-> first token), output (-> first token written), "
            "kv_transfer (posted -> done, on the side that moves the KV)", LATENCY_BUCKETS_S,
            reg, ("phase",))
        for phase in INSTANCE_PHASES:
            self._phases.labels(phase)
        self._vllm = VllmRequestMetrics(model_name, reg)
        for reason in FINISH_REASONS.values():
            self._success.labels(reason)
            self._vllm.success.labels(model_name, reason)

    def finished(self, reason: str) -> None:
        """Count a finished request by finish reason."""
        self._success.labels(reason).inc()
        self._vllm.success.labels(self.model_name, reason).inc()

    def first_token(self, ttft_s: float) -> None:
        """The request's first token reached the API server."""
        self._ttft.observe(ttft_s)
        self._vllm.ttft.observe(ttft_s)

    def next_output(self, gap_s: float) -> None:
        """A later output (one engine step's new tokens) arrived ``gap_s`` after the last."""
        self._vllm.itl.observe(gap_s)
        self._vllm.tpot_legacy.observe(gap_s)

    def tokens(self, *, prompt: int = 0, generated: int = 0) -> None:
        """Count tokens as they are done, whether or not their request will run to its end
        (as vLLM counts every step): a prompt once its first token is out, generated tokens
        as each output brings them."""
        if prompt:
            self._prompt_tokens.inc(prompt)
            self._vllm.prompt_tokens.inc(prompt)
        if generated:
            self._generation_tokens.inc(generated)
            self._vllm.generation_tokens.inc(generated)

    def completed(self, *, start_s: float, first_s: float | None, end_s: float,
                  num_output_tokens: int) -> None:
        """A request ran to its end (not aborted): its latencies."""
        vllm = self._vllm
        self._e2e.observe(end_s - start_s)
        vllm.e2e.observe(end_s - start_s)
        if first_s is not None:
            vllm.decode.observe(end_s - first_s)
            if num_output_tokens > 1:
                self._tpot.observe((end_s - first_s) / (num_output_tokens - 1))
                vllm.request_tpot.observe((end_s - first_s) / (num_output_tokens - 1))

    def observe_timings(self, t: InstanceTimings) -> None:
        """One request's phases (disagg/common/timings.py); no transfer, no kv_transfer."""
        self._phases.labels("queue").observe(t.queue_s)
        self._phases.labels("compute").observe(t.compute_s)
        self._phases.labels("output").observe(t.output_s)
        if t.kv_transfer_s is not None:
            self._phases.labels("kv_transfer").observe(t.kv_transfer_s)
        self._vllm.queue.observe(t.queue_s)
        self._vllm.prefill.observe(t.compute_s)


class VllmRequestMetrics:
    """The vLLM request series of one model, each bound to its ``model_name`` label."""

    def __init__(self, model_name: str, reg: CollectorRegistry) -> None:
        m = ("model_name",)
        self.success = Counter("vllm:request_success_total",
                               "Count of successfully processed requests.",
                               (*m, "finished_reason"), registry=reg)
        self.prompt_tokens = Counter("vllm:prompt_tokens_total",
                                     "Number of prefill tokens processed.", m,
                                     registry=reg).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens_total",
                                         "Number of generation tokens processed.", m,
                                         registry=reg).labels(model_name)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return _histogram(name, doc, buckets, reg, m).labels(model_name)

        self.ttft = hist("vllm:time_to_first_token_seconds",
                         "Histogram of time to first token in seconds.", VLLM_TTFT_BUCKETS_S)
        self.itl = hist("vllm:inter_token_latency_seconds",
                        "Histogram of inter-token latency in seconds.", VLLM_ITL_BUCKETS_S)
        self.tpot_legacy = hist(
            "vllm:time_per_output_token_seconds", "Histogram of time per output token in "
            "seconds (the same as vllm:inter_token_latency_seconds).", VLLM_ITL_BUCKETS_S)
        self.request_tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.", VLLM_ITL_BUCKETS_S)
        self.e2e = hist("vllm:e2e_request_latency_seconds",
                        "Histogram of e2e request latency in seconds.", VLLM_REQUEST_BUCKETS_S)
        self.queue = hist("vllm:request_queue_time_seconds",
                          "Histogram of time spent in WAITING phase for request (received -> "
                          "first scheduled, a decode's wait for its KV included).",
                          VLLM_PHASE_BUCKETS_S)
        self.prefill = hist("vllm:request_prefill_time_seconds",
                            "Histogram of time spent in PREFILL phase for request (first "
                            "scheduled -> first token).", VLLM_PHASE_BUCKETS_S)
        self.decode = hist("vllm:request_decode_time_seconds",
                           "Histogram of time spent in DECODE phase for request (first token "
                           "-> last token).", VLLM_REQUEST_BUCKETS_S)
