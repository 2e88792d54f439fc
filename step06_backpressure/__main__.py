import argparse

from shared.config import ModelConfig, from_args
from shared.server import run_step
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step05_observability.engine import ObservabilityConfig
from step06_backpressure import __doc__
from step06_backpressure.admission import AdmissionConfig
from step06_backpressure.app import LimitsConfig, make_app
from step06_backpressure.engine import BackpressureEngine
from step06_backpressure.gate import GateConfig


def _engine(cfg: ModelConfig, ns: argparse.Namespace) -> BackpressureEngine:
    return BackpressureEngine(cfg, from_args(SchedulerConfig, ns), from_args(RunnerConfig, ns),
                              from_args(ObservabilityConfig, ns), admission=from_args(AdmissionConfig, ns))


if __name__ == "__main__":
    # The gate drains first (--drain-timeout); uvicorn's own graceful wait then has little left to do.
    run_step("step06_backpressure", __doc__, _engine, SchedulerConfig, RunnerConfig, ObservabilityConfig,
             AdmissionConfig, LimitsConfig, GateConfig, make_app=make_app, uvicorn_options=lambda ns: {"timeout_graceful_shutdown": 2})
