"""Step 09's runner with a kernel backend chosen when the engine is built (``--kernels``).

* ``compile``: :mod:`.compiled` (torch.compile of the pieces between attention calls; eager attention);
* ``triton``: :mod:`.triton_layers` (paged attention reading the pool in place, fused RoPE + store,
  add + RMSNorm, act-and-mul). Needs a CUDA device, or ``TRITON_INTERPRET=1`` (tests only: exact
  and thousands of times slower);
* ``torch``: step 09 as it is;
* ``auto`` (default): ``triton`` on CUDA, ``compile`` on a CPU.

The choice, the compile time and dynamo's graph count are served on ``/health`` and
``/v1/models`` (``model``). Compiling happens in :func:`apply_kernels`, before the server reports
ready, so the first request never waits for it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable

import torch

from shared.attention import build_batch
from shared.config import flag_field
from shared.models import LoadedModel
from step04_kvcache.model_runner import ModelRunner, RunnerConfig, resolve_linear_backend
from step07_paged_kv.paged_cache import PagedKVCache
from step10_kernels.compiled import compile_layers, compiled_graphs

log = logging.getLogger("step10_kernels")
KERNELS = ("auto", "torch", "triton", "compile")
TRITON_NEEDS_CUDA = ("--kernels triton needs a CUDA device (upstream Triton has no CPU backend; TRITON_INTERPRET=1 "
                     "runs it on a CPU for tests, thousands of times slower): use --kernels compile on a CPU")


@dataclasses.dataclass(frozen=True, slots=True)
class KernelsConfig:
    kernels: str = flag_field("auto", "what runs between the matmuls: compile (torch.compile of the math around "
                              "attention), triton (paged attention and fused kernels; CUDA), torch (step 09's "
                              "eager ops); auto: triton on CUDA, compile on CPU", choices=KERNELS)
    enforce_eager: bool = flag_field(False, "triton on CUDA: never capture CUDA graphs (by default decode steps of up "
                                     "to --max-seqs sequences replay graphs captured at start-up; vLLM's flag)")
    attention_splits: int = flag_field(0, "triton: KV splits per decoding sequence (flash-decoding; a power of "
                                       "two); 0: chosen per batch to fill the GPU")

    def __post_init__(self) -> None:
        if self.kernels not in KERNELS:
            raise ValueError(f"--kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.kernels == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(TRITON_NEEDS_CUDA)
        if self.attention_splits < 0 or self.attention_splits & (self.attention_splits - 1):
            raise ValueError(f"--attention-splits must be 0 or a power of two, got {self.attention_splits}")


def resolve_kernels(kernels: str, device: torch.device) -> str:
    """``auto`` resolved; ``triton`` refused where Triton cannot run."""
    if kernels == "auto":
        return "triton" if device.type == "cuda" else "compile"
    if kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(TRITON_NEEDS_CUDA)
    return kernels


def kernels_runner(lm: LoadedModel, runner_cfg: RunnerConfig, cfg: KernelsConfig,
                   build: Callable[[RunnerConfig], ModelRunner[PagedKVCache]]) -> ModelRunner[PagedKVCache]:
    """``build(runner_cfg)`` (an earlier step's runner), its model transformed by the chosen kernels
    and warmed up. Under ``compile`` on a float32 CPU, the model is built with plain linears and
    each becomes :class:`.compiled.ShapeDispatchedLinear` (oneDNN for several rows, MKL for one)."""
    kind = resolve_kernels(cfg.kernels, lm.device)
    dispatch = kind == "compile" and resolve_linear_backend(runner_cfg.linear_backend, lm.device, lm.dtype) == "onednn"
    runner = build(dataclasses.replace(runner_cfg, linear_backend="torch") if dispatch else runner_cfg)
    runner.details["kernel_backend"] = kind
    if kind == "triton":
        from step10_kernels.triton_layers import TritonAttentionBackend, use_triton_kernels

        use_triton_kernels(runner.model, TritonAttentionBackend.for_device(runner.device, cfg.attention_splits))
        log.info("kernels triton: warming up (JIT-compiling the kernels)...")
    elif kind == "compile":
        if compile_layers(runner.model, dispatch):
            runner.details["linear_backend"] = "shape-dispatched (1 row: MKL GEMV on the dense weight; more: oneDNN prepacked)"
        log.info("kernels compile: compiling the pieces between attention calls for 1 and N tokens "
                 "(torch.compile, inductor); this takes a while once...")
    if kind != "torch":
        took = warm_up(runner)
        runner.details["compile_s"] = f"{took:.1f}"
        if kind == "compile":
            runner.details["compile_graphs"] = str(compiled_graphs())
        log.info("kernels %s: warm-up done in %.1f s", kind, took)
    return runner


def cuda_graph_wrapper(cfg: KernelsConfig, max_seqs: int) -> Callable[[ModelRunner[PagedKVCache]], ModelRunner[PagedKVCache]]:
    """The wrapper step 09's core puts around its runner: graphs for the Triton path on CUDA, else none."""
    def wrap(runner: ModelRunner[PagedKVCache]) -> ModelRunner[PagedKVCache]:
        if cfg.enforce_eager or runner.details.get("kernel_backend") != "triton" or runner.device.type != "cuda":
            return runner
        from step10_kernels.cuda_graphs import CudaGraphRunner

        t0 = time.perf_counter()
        graphed = CudaGraphRunner(runner, max_seqs)
        graphed.capture_all()
        log.info("CUDA graphs: captured decode batches %s in %.1f s", graphed.details["cuda_graphs"],
                 time.perf_counter() - t0)
        return graphed

    return wrap


def warm_up(runner: ModelRunner[PagedKVCache], prompt_lens: tuple[int, ...] = (1, 2, 3),
            decode_batches: tuple[int, ...] = (1, 2, 3)) -> float:
    """Prefills of 1, 2 and 3 tokens, then decode steps of 1, 2 and 3 sequences, into the first
    blocks of the pool (free at start-up; a sequence that later gets them writes its slots before
    it reads them): every graph (dynamo specializes a batch of one) and kernel is compiled before
    the first request."""
    t0 = time.perf_counter()
    bs = runner.cache.block_size
    blocks = list(range(-(-(max(prompt_lens) + 1) // bs)))
    with torch.inference_mode():
        for n in prompt_lens:
            runner.forward(build_batch([[0] * n], [0], [blocks], bs, runner.device))
        for b in decode_batches:
            runner.forward(build_batch([[0]] * b, [max(prompt_lens)] * b, [blocks] * b, bs, runner.device))
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - t0
