import argparse
import dataclasses
import os
import tempfile

import torch
from fastapi import FastAPI

from shared.config import ModelConfig, from_args
from shared.model import ModelArgs
from shared.models import load_config, prepared
from shared.server import run_step
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step05_observability.request_log import ObservabilityConfig
from step06_backpressure.admission import AdmissionConfig
from step06_backpressure.app import LimitsConfig
from step06_backpressure.gate import GateConfig
from step07_paged_kv.__main__ import assemble_paged
from step07_paged_kv.model_runner import PagedCacheConfig
from step08_quant import DEFAULT_KV_CACHE_GIB
from step08_quant.quantize import QuantConfig
from step09_speculative.__main__ import spec_core
from step09_speculative.config import SpeculativeConfig
from step09_speculative.metrics import SpecDecodingCollector
from step09_speculative.spec_view import spec_step
from step10_kernels.__main__ import assemble as assemble_step10
from step10_kernels.model_runner import KernelsConfig
from step11_multigpu import __doc__
from step11_multigpu.executor import RankZero
from step11_multigpu.model_runner import RankSpec, TPConfig, assign_cores
from step11_multigpu.tp import FLAG, check_tp


def rank_spec(ns: argparse.Namespace, tp: TPConfig) -> RankSpec:
    """The flags every rank builds from; on a CPU each rank's cores, on CUDA no CUDA graphs."""
    model = from_args(ModelConfig, ns)
    cpu = model.device == "cpu" or (model.device == "auto" and not torch.cuda.is_available())
    n = tp.tensor_parallel_size
    cores = assign_cores(n, model.threads, tuple(sorted(os.sched_getaffinity(0)))) if cpu else ()
    model = dataclasses.replace(model, device="cpu" if cpu else "cuda", threads=len(cores[0]) if cpu else model.threads)
    rendezvous = os.path.join(tempfile.mkdtemp(prefix="stepserve-tp-"), "rendezvous")
    return RankSpec(model=model, runner=from_args(RunnerConfig, ns), cache=from_args(PagedCacheConfig, ns),
                    quant=from_args(QuantConfig, ns),
                    kernels=dataclasses.replace(from_args(KernelsConfig, ns), enforce_eager=True),
                    explicit_len=model.max_model_len > 0, world_size=n, cores=cores,
                    init_method=f"file://{rendezvous}", timeout_s=tp.distributed_timeout)


def model_args(cfg: ModelConfig) -> ModelArgs | None:
    """The model's shape, if its config can be read without converting or downloading anything;
    else None, and ``shard_model`` refuses a bad split at load instead (a clear error on /health)."""
    if not prepared(cfg):
        return None
    try:
        return ModelArgs.from_hf_config(load_config(cfg))
    except OSError:
        return None


def validate(ns: argparse.Namespace) -> None:
    """Usage errors before anything loads: sizes the model cannot be split into, more ranks than
    cores (or GPUs), and the parts that cannot run across ranks."""
    tp = from_args(TPConfig, ns)
    n = tp.tensor_parallel_size
    if n == 1:
        return
    if (args := model_args(from_args(ModelConfig, ns))) is not None:
        check_tp(args, n)
    if from_args(SpeculativeConfig, ns).speculative_method == "draft":
        raise ValueError(f"--speculative-method draft runs its draft model on rank 0 alone; with {FLAG} {n} "
                         f"use ngram or none")
    if from_args(PagedCacheConfig, ns).kv_cache_memory_fraction:
        raise ValueError(f"--kv-cache-memory-fraction sizes a pool from one rank's free memory; with {FLAG} {n} "
                         f"give --num-kv-blocks or --kv-cache-gib so that every rank holds the same blocks")
    if torch.cuda.is_available() and from_args(ModelConfig, ns).device != "cpu":
        if n > torch.cuda.device_count():
            raise ValueError(f"{FLAG} {n}: more ranks than the {torch.cuda.device_count()} GPUs")
    else:
        assign_cores(n, from_args(ModelConfig, ns).threads, tuple(sorted(os.sched_getaffinity(0))))


def assemble(ns: argparse.Namespace) -> FastAPI:
    """Step 10's engine with one more part: rank 0's runner sends every batch to N - 1 workers.
    One rank is step 10 exactly."""
    tp = from_args(TPConfig, ns)
    if tp.tensor_parallel_size == 1:
        return assemble_step10(ns)
    rank0 = RankZero(rank_spec(ns, tp))
    return assemble_paged(ns, rank0.build_runner, build_core=spec_core(from_args(SpeculativeConfig, ns), rank0.wrap),
                          collectors=[SpecDecodingCollector], view_extras=[spec_step])


if __name__ == "__main__":  # step 10's server and flags, plus --tensor-parallel-size
    run_step("step11_multigpu", __doc__, assemble, SchedulerConfig, RunnerConfig, PagedCacheConfig, QuantConfig,
             SpeculativeConfig, KernelsConfig, TPConfig, ObservabilityConfig, AdmissionConfig, LimitsConfig,
             GateConfig, defaults={"RunnerConfig.kv_cache_gib": DEFAULT_KV_CACHE_GIB},
             uvicorn_options=lambda ns: {"timeout_graceful_shutdown": 2}, validate=validate)
