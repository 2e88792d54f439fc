import argparse

from shared.config import ModelConfig, from_args
from shared.server import run_step
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step05_observability.engine import ObservabilityConfig
from step06_backpressure.admission import AdmissionConfig
from step06_backpressure.app import LimitsConfig, make_app
from step06_backpressure.gate import GateConfig
from step07_paged_kv import __doc__
from step07_paged_kv.engine import PagedEngine
from step07_paged_kv.model_runner import PagedCacheConfig


def _engine(cfg: ModelConfig, ns: argparse.Namespace) -> PagedEngine:
    return PagedEngine(cfg, from_args(SchedulerConfig, ns), from_args(RunnerConfig, ns),
                       from_args(ObservabilityConfig, ns), admission=from_args(AdmissionConfig, ns),
                       cache=from_args(PagedCacheConfig, ns))


if __name__ == "__main__":  # step 06's server (metrics, limits, admission, gate) around the paged engine
    run_step("step07_paged_kv", __doc__, _engine, SchedulerConfig, RunnerConfig, PagedCacheConfig,
             ObservabilityConfig, AdmissionConfig, LimitsConfig, GateConfig, make_app=make_app,
             uvicorn_options=lambda ns: {"timeout_graceful_shutdown": 2})
