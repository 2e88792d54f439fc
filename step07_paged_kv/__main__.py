import argparse
from typing import Any, Callable, Sequence

from fastapi import FastAPI
from prometheus_client.registry import Collector

from shared.config import ModelConfig, from_args
from shared.models import LoadedModel
from shared.server import run_step
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import EngineCore, StepPolicy
from step04_kvcache.observer import EngineObserver
from step04_kvcache.model_runner import ModelRunner, RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step04_kvcache.engine_view import EngineView, Extra
from step05_observability.metrics import observability
from step05_observability.request_log import ObservabilityConfig
from step06_backpressure.admission import AdmissionConfig, Backlog
from step06_backpressure.app import LimitsConfig, make_app
from step06_backpressure.deadlines import Deadlines
from step06_backpressure.gate import GateConfig
from step06_backpressure.step_cost import StepCostModel, measured_core
from step07_paged_kv import __doc__
from step07_paged_kv.block_manager import BlockManager
from step07_paged_kv.kv_view import kv_pool
from step07_paged_kv.metrics import PagedKVCollector
from step07_paged_kv.model_runner import PagedCacheConfig, build_paged_runner
from step07_paged_kv.paged_cache import PagedKVCache
from step07_paged_kv.scheduler import PagedScheduler


def assemble(ns: argparse.Namespace) -> FastAPI:
    """Step 06's engine and app with step 07's parts swapped in: the paged runner and scheduler."""
    runner_cfg, cache_cfg = from_args(RunnerConfig, ns), from_args(PagedCacheConfig, ns)
    return assemble_paged(ns, lambda lm, explicit_len: build_paged_runner(lm, runner_cfg, cache_cfg, explicit_len))


def paged_core(lm: LoadedModel, runner: ModelRunner[PagedKVCache], sched: SchedulerConfig,
               cache_cfg: PagedCacheConfig, observers: list[EngineObserver], policies: list[StepPolicy]) -> EngineCore:
    """Step 07's engine core: the paged scheduler over a pool of the runner's blocks."""
    blocks = BlockManager(runner.cache.num_blocks, runner.cache.block_size, cache_cfg.enable_prefix_caching)
    return EngineCore(scheduler=PagedScheduler(sched, runner.max_len, lm.eos_token_ids, blocks), runner=runner,
                      observers=observers, policies=policies)


def assemble_paged(ns: argparse.Namespace, build_runner: Callable[[LoadedModel, bool], ModelRunner[PagedKVCache]],
                   build_core: Callable[..., EngineCore] = paged_core,
                   collectors: Sequence[Callable[[Callable[[], Any]], Collector]] = (),
                   view_extras: Sequence[Extra] = ()) -> FastAPI:
    """The assembly around any paged runner (``build_runner(lm, explicit_len)``): step 08 swaps
    in its quantized model's runner and keeps the rest; step 09 also its core (``build_core``,
    :func:`paged_core`'s signature) and adds Prometheus collectors of the scheduler's stats and
    sections of the engine view (``view_extras``)."""
    model, sched = from_args(ModelConfig, ns), from_args(SchedulerConfig, ns)
    cache_cfg, admission = from_args(PagedCacheConfig, ns), from_args(AdmissionConfig, ns)
    registry, metrics, observers = observability(from_args(ObservabilityConfig, ns), model)
    view = EngineView(extras=[kv_pool, *view_extras])  # the playground's engine view, with the KV block pool
    observers.append(view)
    cost = StepCostModel(sched.max_seqs, sched.max_num_batched_tokens)
    backlog = Backlog(admission, sched.max_seqs, sched.max_num_batched_tokens, cost)
    deadlines = Deadlines(admission.request_timeout)

    def build(lm: LoadedModel) -> EngineCore:
        runner = build_runner(lm, model.max_model_len > 0)
        return measured_core(lambda obs, pol: build_core(lm, runner, sched, cache_cfg, obs, pol), cost, sched,
                             lm.model.config.vocab_size, observers, [deadlines])

    engine = AsyncEngine(model, build, request_policies=[backlog])
    metrics.bind_gauges(engine.stats)
    for collector in (PagedKVCollector, *collectors):
        registry.register(collector(lambda: engine.stats().scheduler))
    return make_app(engine, backlog, deadlines, ns, registry, view)


if __name__ == "__main__":  # step 06's server (metrics, limits, admission, gate) around the paged engine
    run_step("step07_paged_kv", __doc__, assemble, SchedulerConfig, RunnerConfig, PagedCacheConfig,
             ObservabilityConfig, AdmissionConfig, LimitsConfig, GateConfig,
             uvicorn_options=lambda ns: {"timeout_graceful_shutdown": 2})
