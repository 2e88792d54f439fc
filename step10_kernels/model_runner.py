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

import torch

from shared.attention import build_batch
from shared.config import flag_field
from step04_kvcache.model_runner import ModelRunner
from step07_paged_kv.paged_cache import PagedKVCache

log = logging.getLogger("step10_kernels")
KERNELS = ("auto", "torch", "triton", "compile")


@dataclasses.dataclass(frozen=True, slots=True)
class KernelsConfig:
    kernels: str = flag_field("auto", "what runs between the matmuls: compile (torch.compile of the math around "
                              "attention), triton (paged attention and fused kernels; CUDA), torch (step 09's "
                              "eager ops); auto: triton on CUDA, compile on CPU", choices=KERNELS)
    attention_splits: int = flag_field(0, "triton: KV splits per decoding sequence (flash-decoding; a power of "
                                       "two); 0: chosen per batch to fill the GPU")

    def __post_init__(self) -> None:
        if self.kernels not in KERNELS:
            raise ValueError(f"--kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.attention_splits < 0 or self.attention_splits & (self.attention_splits - 1):
            raise ValueError(f"--attention-splits must be 0 or a power of two, got {self.attention_splits}")


def resolve_kernels(kernels: str, device: torch.device) -> str:
    """``auto`` resolved; ``triton`` refused where Triton cannot run."""
    if kernels == "auto":
        return "triton" if device.type == "cuda" else "compile"
    if kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernels: triton needs a CUDA device (upstream Triton has no CPU backend; "
                         "TRITON_INTERPRET=1 runs it on a CPU for tests, thousands of times slower): "
                         "use --kernels compile on a CPU")
    return kernels


def apply_kernels(runner: ModelRunner[PagedKVCache], cfg: KernelsConfig) -> ModelRunner[PagedKVCache]:
    """Transform the runner's model in place with the chosen backend and warm it up."""
    kind = resolve_kernels(cfg.kernels, runner.device)
    runner.details["kernel_backend"] = kind
    if kind == "triton":
        from step10_kernels.triton_layers import TritonAttentionBackend, use_triton_kernels

        sms = torch.cuda.get_device_properties(runner.device).multi_processor_count if runner.device.type == "cuda" else 0
        use_triton_kernels(runner.model, TritonAttentionBackend(cfg.attention_splits, target_programs=2 * sms))
        log.info("kernels triton: warming up (JIT-compiling the kernels)...")
    elif kind == "compile":
        from step10_kernels.compiled import compile_counters, compile_layers

        compile_layers(runner.model)
        log.info("kernels compile: compiling the pieces between attention calls for 1 and N tokens "
                 "(torch.compile, inductor); this takes a while once...")
    if kind != "torch":
        took = warm_up(runner)
        runner.details["compile_s"] = f"{took:.1f}"
        if kind == "compile":
            runner.details["compile_graphs"] = str(compile_counters()["graphs"])
        log.info("kernels %s: warm-up done in %.1f s", kind, took)
    return runner


def warm_up(runner: ModelRunner[PagedKVCache], token_counts: tuple[int, ...] = (1, 2, 3)) -> float:
    """One forward of 1, 2 and 3 tokens into block 0 of the pool (free at start-up; any sequence
    that later gets it writes its slots before reading them), so every graph (dynamo specializes a
    batch of one token) and kernel is compiled before the first request."""
    t0 = time.perf_counter()
    blocks = list(range(-(-max(token_counts) // runner.cache.block_size)))
    with torch.inference_mode():
        for n in token_counts:
            runner.forward(build_batch([[0] * n], [0], [blocks], runner.cache.block_size, runner.device))
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - t0
