import argparse

from fastapi import FastAPI

from shared.config import ModelConfig, from_args
from shared.models import LoadedModel
from shared.server import run_step
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import EngineCore
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step05_observability.metrics import EngineMetrics, new_registry
from step05_observability.request_log import ObservabilityConfig, request_log
from step06_backpressure.admission import AdmissionConfig, Backlog
from step06_backpressure.app import LimitsConfig, make_app
from step06_backpressure.deadlines import Deadlines
from step06_backpressure.gate import GateConfig
from step07_paged_kv.block_manager import BlockManager
from step07_paged_kv.metrics import PagedKVCollector
from step07_paged_kv.model_runner import PagedCacheConfig
from step07_paged_kv.scheduler import PagedScheduler
from step08_quant import DEFAULT_KV_CACHE_GIB, __doc__
from step08_quant.model_runner import build_quant_runner
from step08_quant.quantize import QuantConfig


def assemble(ns: argparse.Namespace) -> FastAPI:
    """Step 07's engine and app; only the model runner changes: the quantized model's."""
    model, sched, runner_cfg = from_args(ModelConfig, ns), from_args(SchedulerConfig, ns), from_args(RunnerConfig, ns)
    cache_cfg, admission, quant = from_args(PagedCacheConfig, ns), from_args(AdmissionConfig, ns), from_args(QuantConfig, ns)
    registry = new_registry()
    metrics = EngineMetrics(registry)
    observers = [metrics, *request_log(from_args(ObservabilityConfig, ns))]
    backlog = Backlog(admission, sched.max_seqs, sched.max_num_batched_tokens)
    deadlines = Deadlines(admission.request_timeout)

    def build_core(lm: LoadedModel) -> EngineCore:
        runner = build_quant_runner(lm, runner_cfg, cache_cfg, quant, explicit_len=model.max_model_len > 0)
        blocks = BlockManager(runner.cache.num_blocks, runner.cache.block_size, cache_cfg.enable_prefix_caching)
        return EngineCore(scheduler=PagedScheduler(sched, runner.max_len, lm.eos_token_ids, blocks), runner=runner,
                          observers=observers, policies=[deadlines])

    engine = AsyncEngine(model, build_core, request_policies=[backlog])
    metrics.bind_gauges(engine.stats)
    registry.register(PagedKVCollector(lambda: engine.stats().scheduler))
    return make_app(engine, backlog, deadlines, ns, registry)


if __name__ == "__main__":  # step 07's server; the KV pool's default is sized for bf16 (see the docstring)
    run_step("step08_quant", __doc__, assemble, SchedulerConfig, RunnerConfig, PagedCacheConfig, QuantConfig,
             ObservabilityConfig, AdmissionConfig, LimitsConfig, GateConfig,
             defaults={"RunnerConfig.kv_cache_gib": DEFAULT_KV_CACHE_GIB},
             uvicorn_options=lambda ns: {"timeout_graceful_shutdown": 2})
