import argparse

from fastapi import FastAPI

from shared.config import ModelConfig, from_args
from shared.models import LoadedModel
from shared.server import run_step
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import EngineCore
from step04_kvcache.engine_view import EngineView
from step04_kvcache.model_runner import RunnerConfig, build_contiguous_runner
from step04_kvcache.scheduler import ContiguousScheduler, SchedulerConfig
from step05_observability import __doc__
from step05_observability.app import make_app
from step05_observability.metrics import observability
from step05_observability.request_log import ObservabilityConfig


def assemble(ns: argparse.Namespace) -> FastAPI:
    model, sched, runner_cfg = from_args(ModelConfig, ns), from_args(SchedulerConfig, ns), from_args(RunnerConfig, ns)
    # step 05's parts: a registry and two observers (metrics, request log)
    registry, metrics, observers = observability(from_args(ObservabilityConfig, ns), model)
    view = EngineView()  # and step 04's engine view
    observers.append(view)

    def build_core(lm: LoadedModel) -> EngineCore:  # step 04's parts, watched
        runner = build_contiguous_runner(lm, sched, runner_cfg, explicit_len=model.max_model_len > 0)
        return EngineCore(scheduler=ContiguousScheduler(sched, runner.max_len, lm.eos_token_ids), runner=runner,
                          observers=observers)

    engine = AsyncEngine(model, build_core)
    metrics.bind_gauges(engine.stats)
    return make_app(engine, registry, view)


if __name__ == "__main__":
    run_step("step05_observability", __doc__, assemble, SchedulerConfig, RunnerConfig, ObservabilityConfig)
