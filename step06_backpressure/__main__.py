import argparse

from fastapi import FastAPI

from shared.config import ModelConfig, from_args
from shared.models import LoadedModel
from shared.server import run_step
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import EngineCore
from step04_kvcache.model_runner import RunnerConfig, build_contiguous_runner
from step04_kvcache.scheduler import ContiguousScheduler, SchedulerConfig
from step04_kvcache.engine_view import EngineView
from step05_observability.metrics import observability
from step05_observability.request_log import ObservabilityConfig
from step06_backpressure import __doc__
from step06_backpressure.admission import AdmissionConfig, Backlog
from step06_backpressure.app import LimitsConfig, make_app
from step06_backpressure.deadlines import Deadlines
from step06_backpressure.gate import GateConfig
from step06_backpressure.step_cost import StepCostModel, measured_core


def assemble(ns: argparse.Namespace) -> FastAPI:
    model, sched, runner_cfg = from_args(ModelConfig, ns), from_args(SchedulerConfig, ns), from_args(RunnerConfig, ns)
    registry, metrics, observers = observability(from_args(ObservabilityConfig, ns), model)
    view = EngineView()  # the playground's engine view
    observers.append(view)
    admission = from_args(AdmissionConfig, ns)
    cost = StepCostModel(sched.max_seqs, sched.max_num_batched_tokens)  # step 06's parts: the measured step
    backlog = Backlog(admission, sched.max_seqs, sched.max_num_batched_tokens, cost)  # cost, two policies
    deadlines = Deadlines(admission.request_timeout)

    def build_core(lm: LoadedModel) -> EngineCore:
        runner = build_contiguous_runner(lm, sched, runner_cfg, explicit_len=model.max_model_len > 0)
        return measured_core(lambda obs, pol: EngineCore(scheduler=ContiguousScheduler(
            sched, runner.max_len, lm.eos_token_ids), runner=runner, observers=obs, policies=pol),
            cost, sched, lm.model.config.vocab_size, observers, [deadlines])

    engine = AsyncEngine(model, build_core, request_policies=[backlog])
    metrics.bind_gauges(engine.stats)
    return make_app(engine, backlog, deadlines, ns, registry, view)


if __name__ == "__main__":
    # The gate drains first (--drain-timeout); uvicorn's own graceful wait then has little left to do.
    run_step("step06_backpressure", __doc__, assemble, SchedulerConfig, RunnerConfig, ObservabilityConfig,
             AdmissionConfig, LimitsConfig, GateConfig, uvicorn_options=lambda ns: {"timeout_graceful_shutdown": 2})
