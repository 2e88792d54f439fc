import argparse

from fastapi import FastAPI

from shared.config import from_args
from shared.server import run_step
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step05_observability.request_log import ObservabilityConfig
from step06_backpressure.admission import AdmissionConfig
from step06_backpressure.app import LimitsConfig
from step06_backpressure.gate import GateConfig
from step07_paged_kv.__main__ import assemble_paged
from step07_paged_kv.model_runner import PagedCacheConfig
from step08_quant import DEFAULT_KV_CACHE_GIB, __doc__
from step08_quant.model_runner import build_quant_runner
from step08_quant.quantize import QuantConfig


def assemble(ns: argparse.Namespace) -> FastAPI:
    """Step 07's engine and app; only the model runner changes: the quantized model's."""
    runner_cfg, cache_cfg, quant = from_args(RunnerConfig, ns), from_args(PagedCacheConfig, ns), from_args(QuantConfig, ns)
    return assemble_paged(ns, lambda lm, explicit_len: build_quant_runner(lm, runner_cfg, cache_cfg, quant, explicit_len))


if __name__ == "__main__":  # step 07's server; the KV pool's default is sized for bf16 (see the docstring)
    run_step("step08_quant", __doc__, assemble, SchedulerConfig, RunnerConfig, PagedCacheConfig, QuantConfig,
             ObservabilityConfig, AdmissionConfig, LimitsConfig, GateConfig,
             defaults={"RunnerConfig.kv_cache_gib": DEFAULT_KV_CACHE_GIB},
             uvicorn_options=lambda ns: {"timeout_graceful_shutdown": 2})
