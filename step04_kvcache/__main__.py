import argparse

from fastapi import FastAPI

from shared.api import build_app
from shared.config import ModelConfig, from_args
from shared.models import LoadedModel
from shared.server import run_step
from step04_kvcache import __doc__
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import EngineCore
from step04_kvcache.engine_view import EngineView
from step04_kvcache.model_runner import RunnerConfig, build_contiguous_runner
from step04_kvcache.scheduler import ContiguousScheduler, SchedulerConfig


def assemble(ns: argparse.Namespace) -> FastAPI:
    model, sched, runner_cfg = from_args(ModelConfig, ns), from_args(SchedulerConfig, ns), from_args(RunnerConfig, ns)

    view = EngineView()  # the playground's engine view (GET /debug/engine)

    def build_core(lm: LoadedModel) -> EngineCore:  # once the weights are loaded
        runner = build_contiguous_runner(lm, sched, runner_cfg, explicit_len=model.max_model_len > 0)
        return EngineCore(scheduler=ContiguousScheduler(sched, runner.max_len, lm.eos_token_ids), runner=runner,
                          observers=[view])

    engine = AsyncEngine(model, build_core)
    app = build_app(engine)
    view.attach(app, engine)
    return app


if __name__ == "__main__":
    run_step("step04_kvcache", __doc__, assemble, SchedulerConfig, RunnerConfig)
