"""The model side of a step: our Transformer, its KV cache, and one forward per step.

Step 04's cache is ``shared.kv_cache.ContiguousKVCache``: ``max_seqs`` rows of ``max_len`` positions,
allocated once at start-up, one row per running sequence (its block table is ``[row]``). It is
the simplest layout and deliberately wasteful: every row reserves ``max_len`` slots whatever
its sequence's length, so ``--max-seqs`` x ``--max-model-len`` must fit in ``--kv-cache-gib``
(Gemma 3 270M, float32: 36 KiB per token, so its full 32k context for 16 rows would need 19 GiB).

The linear layers run on oneDNN with prepacked weights by default on CPU (``--linear-backend``,
the transform in :mod:`shared.cpu_linear`): a choice made when the engine is built, the model
never checks it.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Generic, Mapping, TypeVar

import torch

from shared.attention import BatchInputs, build_batch
from shared.config import flag_field
from shared.cpu_linear import onednn_usable, use_onednn_linears
from shared.kv_cache import ContiguousKVCache, KVCache
from shared.model import ModelArgs, Transformer
from shared.models import LoadedModel
from step04_kvcache.prompt_logprobs import prompt_spans, span_rows
from step04_kvcache.scheduler import SchedulerConfig, SchedulerOutput

log = logging.getLogger("step04_kvcache")
GIB = 2 ** 30
C = TypeVar("C", bound=KVCache)  # the cache layout


@dataclasses.dataclass(frozen=True, slots=True)
class RunnerConfig:
    kv_cache_gib: float = flag_field(4.0, "memory for the contiguous KV cache in GiB; it holds --max-seqs "
                                     "rows of --max-model-len positions (without --max-model-len the "
                                     "context is cut to what fits)")
    linear_backend: str = flag_field("auto", "matmuls of the linear layers: torch (F.linear, MKL on CPU), "
                                     "onednn (weights prepacked once, shared.cpu_linear; CPU, float32), auto: onednn where it "
                                     "applies", choices=("auto", "torch", "onednn"))

    def __post_init__(self) -> None:
        if not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")


def resolve_linear_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    fits = onednn_usable(device, dtype)
    if backend == "onednn" and not fits:
        raise ValueError(f"linear_backend: onednn needs a CPU and float32, got {device.type} and {dtype}")
    return "onednn" if backend == "onednn" or (backend == "auto" and fits) else "torch"


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    return 2 * args.num_layers * args.num_kv_heads * args.head_dim * dtype.itemsize  # K and V


def cache_row_len(model_len: int, explicit: bool, max_seqs: int, bytes_per_token: int, gib: float) -> int:
    """Positions per cache row: ``model_len`` if ``max_seqs`` rows of it fit in ``gib``, else what fits.

    An explicit ``--max-model-len`` that does not fit is an error; the model's own limit is cut.
    """
    fits = int(gib * GIB) // (max_seqs * bytes_per_token)
    if model_len <= fits:
        return model_len
    need = model_len * max_seqs * bytes_per_token / GIB
    if explicit or fits < 2:
        raise ValueError(f"max_model_len: {max_seqs} rows of {model_len} tokens need {need:.1f} GiB of KV cache, "
                         f"more than --kv-cache-gib {gib}: lower --max-model-len or --max-seqs, or raise "
                         f"--kv-cache-gib")
    log.warning("context cut from %d to %d tokens: %d contiguous rows of %d would need %.1f GiB "
                "(--kv-cache-gib %s)", model_len, fits, max_seqs, model_len, need, gib)
    return fits


def build_model(lm: LoadedModel, cfg: RunnerConfig,
                shard: Callable[[Transformer], Transformer] | None = None) -> Transformer:
    """Our Transformer over the loaded weights (shared, not copied), with the transforms the flags
    choose (here the linear backend; later steps add theirs). ``shard``: a later step's transform
    of the float model before any other (step 11's tensor-parallel slicing)."""
    model = Transformer.from_hf_model(lm.model)
    if shard is not None:
        model = shard(model)
    if resolve_linear_backend(cfg.linear_backend, lm.device, lm.dtype) == "onednn":
        model = use_onednn_linears(model)
    return model


def model_details(lm: LoadedModel, cfg: RunnerConfig) -> dict[str, str]:
    """What :func:`build_model` runs, in words: served on /health and /v1/models."""
    return {"dtype": str(lm.dtype).removeprefix("torch."),
            "linear_backend": resolve_linear_backend(cfg.linear_backend, lm.device, lm.dtype)}


class ModelRunner(Generic[C]):
    """One forward per step over any cache layout (``shared.kv_cache.KVCache``): it packs the
    scheduled tokens, their positions and their sequences' block tables into one batch."""

    def __init__(self, model: Transformer, cache: C, device: torch.device, max_len: int,
                 details: Mapping[str, str] | None = None) -> None:
        self.model, self.cache, self.device = model, cache, device
        self.max_len = max_len  # most tokens a sequence may hold: the context the engine serves
        dtype = lambda t: str(t.dtype).removeprefix("torch.")  # noqa: E731
        # How the model runs, for /health and /v1/models (a later step's transforms add theirs).
        self.details: dict[str, str] = {"kv_cache_dtype": dtype(cache.k[0]), **(details or {})}

    def prepare(self, out: SchedulerOutput) -> BatchInputs:
        """Pack the step's new tokens (decodes first) and keep logits only for the sampling rows."""
        tokens = [[s.last_token_id] for s in out.decodes]
        tokens += [list(c.seq.token_ids(c.start, c.start + c.num_tokens)) for c in out.prefills]
        context = [s.num_computed_tokens for s in out.decodes] + [c.start for c in out.prefills]
        tables = [s.block_table for s in out.scheduled_seqs]
        b = build_batch(tokens, context, tables, self.cache.block_size, self.device)
        n = len(out.decodes)
        sampling = [*range(n), *(n + i for i, c in enumerate(out.prefills) if c.samples)]
        extra = span_rows(prompt_spans(out))  # rows whose logits give prompt logprobs, after the sampling rows
        if len(sampling) == len(tables) and not extra:  # the common case: build_batch's indices fit
            return b
        index = torch.tensor(sampling, dtype=torch.long, device=self.device)
        rows = torch.cat([b.logits_indices[index], torch.tensor(extra, dtype=torch.long, device=self.device)])
        return dataclasses.replace(b, logits_indices=rows)

    def forward(self, inputs: BatchInputs) -> torch.Tensor:
        """Logits ``[rows that sample + prompt-logprob rows, vocab]``; writes the new tokens' K/V."""
        return self.model(inputs.input_ids, inputs.positions, self.cache, inputs.attn_metadata,
                          inputs.logits_indices)

    def failure(self) -> str | None:
        """Why this runner can no longer serve (a runner whose ranks live in other processes, step
        11, finds one dead); None while it can. The engine reads it after every step and on ``/health``."""
        return None

    def close(self) -> None:
        """Release what the runner holds outside this process (step 11's worker processes)."""


def build_contiguous_runner(lm: LoadedModel, sched: SchedulerConfig, cfg: RunnerConfig,
                            explicit_len: bool) -> ModelRunner[ContiguousKVCache]:
    """Step 04's runner: the model and a contiguous cache of ``--max-seqs`` rows, each as long as
    ``--kv-cache-gib`` allows (at most the model's context)."""
    model = build_model(lm, cfg)
    a = model.args
    max_len = cache_row_len(lm.max_model_len, explicit_len, sched.max_seqs, kv_bytes_per_token(a, lm.dtype),
                            cfg.kv_cache_gib)
    cache = ContiguousKVCache.allocate(a.num_layers, sched.max_seqs, max_len, a.num_kv_heads, a.head_dim,
                                       lm.dtype, lm.device)
    return ModelRunner(model, cache, lm.device, max_len, model_details(lm, cfg))
