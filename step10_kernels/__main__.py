import argparse

from fastapi import FastAPI

from shared.config import from_args
from shared.models import LoadedModel
from shared.server import run_step
from step04_kvcache.model_runner import ModelRunner, RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step05_observability.request_log import ObservabilityConfig
from step06_backpressure.admission import AdmissionConfig
from step06_backpressure.app import LimitsConfig
from step06_backpressure.gate import GateConfig
from step07_paged_kv.__main__ import assemble_paged
from step07_paged_kv.model_runner import PagedCacheConfig
from step07_paged_kv.paged_cache import PagedKVCache
from step08_quant import DEFAULT_KV_CACHE_GIB
from step08_quant.model_runner import build_quant_runner
from step08_quant.quantize import QuantConfig
from step09_speculative.__main__ import spec_core
from step09_speculative.config import SpeculativeConfig
from step09_speculative.metrics import SpecDecodingCollector
from step09_speculative.spec_view import spec_step
from step10_kernels import __doc__
from step10_kernels.model_runner import KernelsConfig, cuda_graph_wrapper, kernels_runner


def assemble(ns: argparse.Namespace) -> FastAPI:
    """Step 09's engine; its runner's model gets the kernel backend (``--kernels``)."""
    runner_cfg, cache_cfg, quant = from_args(RunnerConfig, ns), from_args(PagedCacheConfig, ns), from_args(QuantConfig, ns)
    kernels = from_args(KernelsConfig, ns)

    def build_runner(lm: LoadedModel, explicit_len: bool) -> ModelRunner[PagedKVCache]:
        return kernels_runner(lm, runner_cfg, kernels,
                              lambda cfg: build_quant_runner(lm, cfg, cache_cfg, quant, explicit_len))

    graphs = cuda_graph_wrapper(kernels, from_args(SchedulerConfig, ns).max_seqs)
    return assemble_paged(ns, build_runner, build_core=spec_core(from_args(SpeculativeConfig, ns), graphs),
                          collectors=[SpecDecodingCollector], view_extras=[spec_step])


if __name__ == "__main__":  # step 09's server and flags, plus --kernels
    run_step("step10_kernels", __doc__, assemble, SchedulerConfig, RunnerConfig, PagedCacheConfig, QuantConfig,
             SpeculativeConfig, KernelsConfig, ObservabilityConfig, AdmissionConfig, LimitsConfig, GateConfig,
             defaults={"RunnerConfig.kv_cache_gib": DEFAULT_KV_CACHE_GIB},
             uvicorn_options=lambda ns: {"timeout_graceful_shutdown": 2})
