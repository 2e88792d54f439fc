"""One rank's runner: step 10's (quantized, kernel-transformed) runner over this rank's slice.

Every rank builds its runner with this same function from the same flags (:class:`RankSpec`, sent
to each worker process), so every rank holds the same blocks and runs the same collectives in the
same order, warm-up included. Rank 0's runner is then wrapped by :class:`.executor.TPRunner`,
which sends each step's batch to the others before running its own forward.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch

from shared.config import ModelConfig, flag_field
from shared.models import LoadedModel
from step04_kvcache.model_runner import ModelRunner, RunnerConfig
from step07_paged_kv.model_runner import PagedCacheConfig
from step07_paged_kv.paged_cache import PagedKVCache
from step08_quant.model_runner import build_quant_runner
from step08_quant.quantize import QuantConfig
from step10_kernels.model_runner import KernelsConfig, kernels_runner
from step11_multigpu.tp import FLAG, parallel_vocab, shard_model


@dataclasses.dataclass(frozen=True, slots=True)
class TPConfig:
    tensor_parallel_size: int = flag_field(1, "ranks the model is split over (Megatron-style tensor parallelism): "
                                           "this process is rank 0 (API, scheduler, sampler) and starts N - 1 "
                                           "worker processes; on a CPU each rank is pinned to its own cores "
                                           "(--threads per rank), on CUDA one GPU per rank")
    distributed_timeout: float = flag_field(300.0, "seconds a collective may wait for a live but stuck rank "
                                            "before it fails (a dead rank is noticed at once)")

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"{FLAG} must be >= 1, got {self.tensor_parallel_size}")
        if not self.distributed_timeout > 0:
            raise ValueError(f"--distributed-timeout must be > 0, got {self.distributed_timeout}")


@dataclasses.dataclass(frozen=True, slots=True)
class RankSpec:
    """Everything a rank needs to build its runner and join the group: pickled to each worker."""

    model: ModelConfig
    runner: RunnerConfig
    cache: PagedCacheConfig
    quant: QuantConfig
    kernels: KernelsConfig
    explicit_len: bool
    world_size: int
    cores: tuple[tuple[int, ...], ...]  # per rank; empty on CUDA (one GPU per rank instead)
    init_method: str  # torch.distributed rendezvous (a fresh file:// per server)
    timeout_s: float

    @property
    def backend(self) -> str:
        return "nccl" if self.model.device == "cuda" else "gloo"


def assign_cores(world_size: int, threads: int, available: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Each rank's own cores: ``threads`` each (0: an equal share of ``available``)."""
    if world_size > len(available):
        raise ValueError(f"{FLAG} {world_size}: more ranks than the {len(available)} CPU cores this process may "
                         f"use (each rank needs a core of its own)")
    per = threads or len(available) // world_size
    if per * world_size > len(available):
        raise ValueError(f"--threads {threads} x {FLAG} {world_size} ranks = {per * world_size} threads, more "
                         f"than the {len(available)} CPU cores this process may use")
    return tuple(available[r * per:(r + 1) * per] for r in range(world_size))


def pin(spec: RankSpec, rank: int) -> None:
    """This thread (and the OpenMP threads it starts) on the rank's cores; on CUDA, its GPU."""
    if spec.cores:
        os.sched_setaffinity(0, spec.cores[rank])
        torch.set_num_threads(len(spec.cores[rank]))
    if spec.backend == "nccl":
        torch.cuda.set_device(rank)


def build_rank_runner(lm: LoadedModel, spec: RankSpec, rank: int) -> ModelRunner[PagedKVCache]:
    """Step 10's runner over rank ``rank``'s slice: shard the float model, quantize (step 08),
    wrap the vocabulary, then the kernels (step 10) and their warm-up (collective: all ranks)."""
    split = spec.world_size > 1  # one rank: step 10's runner as it is
    shard = functools.partial(shard_model, rank=rank, world_size=spec.world_size) if split else None

    def build(cfg: RunnerConfig) -> ModelRunner[PagedKVCache]:
        runner = build_quant_runner(lm, cfg, spec.cache, spec.quant, spec.explicit_len, shard)
        if split:
            parallel_vocab(runner.model, rank, spec.world_size)
        return runner

    runner = kernels_runner(lm, spec.runner, spec.kernels, build)
    runner.details |= {"tensor_parallel_size": str(spec.world_size), "distributed_backend": spec.backend}
    return runner

