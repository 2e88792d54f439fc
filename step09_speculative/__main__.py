import argparse
from typing import Callable

from fastapi import FastAPI

from shared.config import from_args
from shared.models import LoadedModel
from shared.server import run_step
from step04_kvcache.engine_core import EngineCore, StepPolicy
from step04_kvcache.model_runner import ModelRunner, RunnerConfig
from step04_kvcache.observer import EngineObserver
from step04_kvcache.scheduler import SchedulerConfig
from step05_observability.request_log import ObservabilityConfig
from step06_backpressure.admission import AdmissionConfig
from step06_backpressure.app import LimitsConfig
from step06_backpressure.gate import GateConfig
from step07_paged_kv.__main__ import assemble_paged
from step07_paged_kv.block_manager import BlockManager
from step07_paged_kv.model_runner import PagedCacheConfig
from step07_paged_kv.paged_cache import PagedKVCache
from step08_quant import DEFAULT_KV_CACHE_GIB
from step08_quant.model_runner import build_quant_runner
from step08_quant.quantize import QuantConfig
from step09_speculative import __doc__
from step09_speculative.config import SpeculativeConfig
from step09_speculative.draft import DraftModelProposer, early_exit, int4_draft
from step09_speculative.metrics import SpecDecodingCollector
from step09_speculative.spec_view import spec_step
from step09_speculative.model_runner import SpecModelRunner
from step09_speculative.ngram import NgramProposer
from step09_speculative.rejection import SpeculativeSampler
from step09_speculative.scheduler import SpecScheduler


def spec_core(spec: SpeculativeConfig,
              wrap: Callable[[ModelRunner[PagedKVCache]], ModelRunner[PagedKVCache]] = lambda runner: runner):
    """Step 07's core with three parts swapped: the runner proposes and verifies, the scheduler
    reserves (and gives back) room for drafts, the sampler accepts or rejects them. ``wrap``: a
    later step's wrapper around the verifying runner (step 10's CUDA graphs)."""

    def build(lm: LoadedModel, runner: ModelRunner[PagedKVCache], sched: SchedulerConfig, cache_cfg: PagedCacheConfig,
              observers: list[EngineObserver], policies: list[StepPolicy]) -> EngineCore:
        proposer = {"none": lambda: None,
                    "ngram": lambda: NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max),
                    "draft": lambda: DraftModelProposer(
                        int4_draft(lm) if spec.speculative_draft == "int4" else
                        early_exit(runner.model, spec.speculative_draft_layers), runner.cache, runner.device),
                    }[spec.speculative_method]()
        verifier = SpecModelRunner(runner, proposer, spec.k)
        blocks = BlockManager(runner.cache.num_blocks, runner.cache.block_size, cache_cfg.enable_prefix_caching)
        return EngineCore(scheduler=SpecScheduler(sched, runner.max_len, lm.eos_token_ids, blocks, spec),
                          runner=wrap(verifier), observers=observers, policies=policies,
                          sampler=SpeculativeSampler(lm.eos_token_ids))

    return build


def assemble(ns: argparse.Namespace) -> FastAPI:
    """Step 08's runner (the quantized model), inside step 09's core."""
    runner_cfg, cache_cfg, quant = from_args(RunnerConfig, ns), from_args(PagedCacheConfig, ns), from_args(QuantConfig, ns)
    return assemble_paged(ns, lambda lm, explicit_len: build_quant_runner(lm, runner_cfg, cache_cfg, quant, explicit_len),
                          build_core=spec_core(from_args(SpeculativeConfig, ns)), collectors=[SpecDecodingCollector],
                          view_extras=[spec_step])


if __name__ == "__main__":  # step 08's server and flags, plus the speculative ones
    run_step("step09_speculative", __doc__, assemble, SchedulerConfig, RunnerConfig, PagedCacheConfig, QuantConfig,
             SpeculativeConfig, ObservabilityConfig, AdmissionConfig, LimitsConfig, GateConfig,
             defaults={"RunnerConfig.kv_cache_gib": DEFAULT_KV_CACHE_GIB},
             uvicorn_options=lambda ns: {"timeout_graceful_shutdown": 2})
