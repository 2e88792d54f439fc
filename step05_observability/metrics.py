"""Prometheus metrics of the engine, vLLM's meanings under the ``stepserve:`` prefix (or vLLM's own
names and labels with ``--metrics-namespace vllm``: :class:`VllmNamedRegistry`).

Counters and histograms are fed by the observer callbacks on the engine thread (cheap: a few
``inc``/``observe`` calls, each a lock and a bucket search); the gauges read fields of the engine's
typed ``EngineStats`` when Prometheus scrapes, so an idle server reports its real state.

Inter-token latency: the engine has no per-token timestamps, but every running sequence that has
finished its prompt decodes one token in every step (step 04's scheduler), so the gap between two
of its tokens is the interval between the ends of two consecutive steps. Each step observes that
interval once per decoding sequence, which is the pooled per-token ITL the benchmark measures,
minus the HTTP path. The per-request time per output token, ``(finish - first token) / (n - 1)``,
is observed once per finished request.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.metrics_core import Metric

from shared.config import ModelConfig
from shared.models import served_name
from step04_kvcache.engine import EngineStats
from step04_kvcache.observer import EngineObserver, RequestStats, StepStats
from step05_observability.request_log import ObservabilityConfig, request_log

PREFIX = "stepserve:"
FINISH_REASONS = ("stop", "length", "abort", "error")
STEP_PHASES = ("prefill", "decode")  # prefill: the step fed prompt tokens (perhaps beside decodes)

# Seconds: vLLM's buckets, stretched for a CPU where a step takes 0.05-1 s and a prefill seconds.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                         10.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


# The series whose name and meaning are vLLM's own (vLLM 0.32, ``vllm/v1/metrics/loggers.py`` and
# ``v1/spec_decode/metrics.py``; its "Production Metrics" documentation lists them): under
# ``--metrics-namespace vllm`` they are exposed as ``vllm:<name>`` with vLLM's labels. Ours that
# vLLM lacks (step time, batch size, admission, acceptance rate) keep the ``stepserve:`` prefix.
VLLM_SERIES = frozenset({
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "request_success", "prompt_tokens",
    "generation_tokens", "time_to_first_token_seconds", "inter_token_latency_seconds",
    "request_time_per_output_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
    "request_inference_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
    "request_prompt_tokens", "request_generation_tokens", "iteration_tokens_total", "num_preemptions",
    "prefix_cache_queries", "prefix_cache_hits", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
    "spec_decode_num_accepted_tokens", "spec_decode_num_accepted_tokens_per_pos"})
NAMESPACES = ("stepserve", "vllm")


class VllmNamedRegistry(CollectorRegistry):
    """A registry that exposes vLLM's series (:data:`VLLM_SERIES`) under vLLM's names and labels
    (``vllm:<name>{model_name="<served name>", engine="0", ...}``), so that vLLM's Grafana dashboard
    and tools that scrape vLLM's ``/metrics`` read them unchanged. The series are recorded under
    ``stepserve:`` as always and renamed as they are scraped."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.labels = {"model_name": model_name, "engine": "0"}

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            short = family.name.removeprefix(PREFIX)
            if short == family.name or short not in VLLM_SERIES:
                yield family
                continue
            renamed = Metric("vllm:" + short, family.documentation, family.type, family.unit)
            renamed.samples = [s._replace(name="vllm:" + s.name.removeprefix(PREFIX),
                                          labels={**self.labels, **s.labels}) for s in family.samples]
            yield renamed


def new_registry(namespace: str = "stepserve", model_name: str = "") -> CollectorRegistry:
    """One registry per engine, never the global one, so that many engines can live in one
    process; with the process's CPU seconds, resident memory and open fds. ``namespace`` vllm: the
    series vLLM also has under its names and labels (:class:`VllmNamedRegistry`)."""
    if namespace not in NAMESPACES:
        raise ValueError(f"metrics_namespace: must be one of {NAMESPACES}, got {namespace!r}")
    registry = VllmNamedRegistry(model_name) if namespace == "vllm" else CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


class EngineMetrics:
    """An :class:`~step04_kvcache.observer.EngineObserver` that records into ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r, p = registry, PREFIX
        self.request_success = Counter(p + "request_success", "Finished requests, by finish reason "
                                       "(stop, length, abort, error)", ["finished_reason"], registry=r)
        for reason in FINISH_REASONS:  # every series exists from the start, at 0
            self.request_success.labels(reason)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        h = lambda name, doc, buckets: Histogram(p + name, doc, buckets=buckets, registry=r)  # noqa: E731
        self.ttft = h("time_to_first_token_seconds", "Arrival to first token", LATENCY_BUCKETS)
        self.itl = h("inter_token_latency_seconds", "Gap between two tokens of a sequence: the interval "
                     "between consecutive engine steps, once per decoding sequence", TOKEN_LATENCY_BUCKETS)
        self.tpot = h("request_time_per_output_token_seconds", "Per request: (finish - first token) / "
                      "(output tokens - 1)", TOKEN_LATENCY_BUCKETS)
        self.e2e = h("e2e_request_latency_seconds", "Arrival to finish", LATENCY_BUCKETS)
        self.queue = h("request_queue_time_seconds", "Arrival to the step that first ran the request",
                       LATENCY_BUCKETS)
        self.prefill = h("request_prefill_time_seconds", "First scheduled to first token", LATENCY_BUCKETS)
        self.inference = h("request_inference_time_seconds", "First scheduled to finish (prefill and decode)",
                           LATENCY_BUCKETS)
        self.decode = h("request_decode_time_seconds", "First token to finish", LATENCY_BUCKETS)
        self.req_prompt = h("request_prompt_tokens", "Prompt tokens per finished request", COUNT_BUCKETS)
        self.req_generation = h("request_generation_tokens", "Generated tokens per finished request",
                                COUNT_BUCKETS)
        step_time = Histogram(p + "engine_step_time_seconds", "Duration of one engine step (schedule, "
                              "prepare, forward, sample, update); phase prefill if it fed prompt tokens",
                              ["phase"], buckets=STEP_BUCKETS, registry=r)
        self.step_time = {phase: step_time.labels(phase) for phase in STEP_PHASES}
        self.batch_size = h("step_batch_size", "Sequences in one engine step (decodes + prefills)",
                            COUNT_BUCKETS)
        self.iteration_tokens = h("iteration_tokens_total", "Tokens fed in one engine step", COUNT_BUCKETS)
        self._last_step_time: float | None = None  # engine thread only

    def bind_gauges(self, stats: Callable[[], EngineStats]) -> None:
        """Gauges read the engine's stats (``/health``'s numbers) at scrape time."""
        r, p = self.registry, PREFIX

        def read(field: Callable[[EngineStats], float]) -> Callable[[], float]:
            return lambda: field(s) if (s := stats()).scheduler is not None else 0.0

        Gauge(p + "num_requests_running", "Requests in the running batch", registry=r).set_function(
            read(lambda s: s.scheduler.num_running))
        Gauge(p + "num_requests_waiting", "Requests waiting to be scheduled", registry=r).set_function(
            read(lambda s: s.scheduler.num_waiting + s.num_pending))
        Gauge(p + "kv_cache_usage_perc", "Fraction of KV-cache slots reserved (0-1)", registry=r).set_function(
            read(lambda s: s.scheduler.kv_usage))

    # ---- observer callbacks: the engine thread ------------------------------------------------

    def on_step(self, s: StepStats) -> None:
        if s.num_prefill_tokens:
            self.prompt_tokens.inc(s.num_prefill_tokens)
        if s.num_sampled:
            self.generation_tokens.inc(s.num_sampled)
        self.step_time["prefill" if s.num_prefill_seqs else "decode"].observe(s.step_s)
        self.batch_size.observe(s.batch_size)
        self.iteration_tokens.observe(s.num_batched_tokens)
        last, self._last_step_time = self._last_step_time, s.time
        if last is not None:
            gap = s.time - last
            for _ in range(s.num_decode_seqs):
                self.itl.observe(gap)

    def on_request_finished(self, r: RequestStats) -> None:
        self.request_success.labels(r.finish_reason).inc()
        self.e2e.observe(r.finish_time - r.arrival_time)
        self.req_prompt.observe(r.num_prompt_tokens)
        self.req_generation.observe(r.num_output_tokens)
        if r.first_scheduled_time is not None:
            self.queue.observe(r.first_scheduled_time - r.arrival_time)
            self.inference.observe(r.finish_time - r.first_scheduled_time)
        if r.first_token_time is None:
            return
        self.ttft.observe(r.first_token_time - r.arrival_time)
        self.decode.observe(r.finish_time - r.first_token_time)
        if r.first_scheduled_time is not None:
            self.prefill.observe(r.first_token_time - r.first_scheduled_time)
        if r.num_output_tokens > 1:
            self.tpot.observe((r.finish_time - r.first_token_time) / (r.num_output_tokens - 1))


def observability(cfg: ObservabilityConfig, model: ModelConfig) -> tuple[CollectorRegistry, EngineMetrics,
                                                                          list[EngineObserver]]:
    """Step 05's parts as every later step assembles them: the registry (named by
    ``--metrics-namespace``), the metrics observer on it, and the observers (metrics, request log)."""
    registry = new_registry(cfg.metrics_namespace, served_name(model))
    metrics = EngineMetrics(registry)
    return registry, metrics, [metrics, *request_log(cfg)]
