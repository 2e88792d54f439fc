"""Step 04's model runner over a paged cache: one pool of blocks sized by bytes, not by rows.

The runner is step 04's :class:`ModelRunner` as it is (it reads each sequence's block table and
``shared.attention`` gathers the blocks); only how the cache is built and sized is new here.

The pool's size is ``--num-kv-blocks`` if given, else the bytes of ``--kv-cache-memory-fraction``
of the memory available at start-up, else ``--kv-cache-gib`` (step 04's flag, same default: the
two steps compare at the same KV memory budget). A sequence may grow to the model's context or to
the whole pool, whichever is smaller; how many run at once is up to the blocks they really use.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import torch

from shared.config import flag_field
from shared.model import Transformer
from shared.models import LoadedModel
from step04_kvcache.model_runner import GIB, ModelRunner, RunnerConfig, build_model, kv_bytes_per_token, model_details
from step07_paged_kv.paged_cache import PagedKVCache

log = logging.getLogger("step07_paged_kv")


@dataclasses.dataclass(frozen=True, slots=True)
class PagedCacheConfig:
    block_size: int = flag_field(16, "tokens per KV block")
    num_kv_blocks: int = flag_field(0, "blocks in the KV pool (0: as many as --kv-cache-memory-fraction or "
                                    "--kv-cache-gib holds)")
    kv_cache_memory_fraction: float = flag_field(0.0, "size the KV pool as this fraction of the memory "
                                                 "available at start-up (0: use --kv-cache-gib)")
    enable_prefix_caching: bool = flag_field(True, "share cached full blocks between sequences with the same "
                                             "prefix and skip their prefill")

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks < 0:
            raise ValueError(f"num_kv_blocks must be >= 0, got {self.num_kv_blocks}")
        if not 0 <= self.kv_cache_memory_fraction < 1:
            raise ValueError(f"kv_cache_memory_fraction must be in [0, 1), got {self.kv_cache_memory_fraction}")


def available_memory(device: torch.device) -> int:
    """Bytes free now: the GPU's, or the host's MemAvailable-like figure."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pool_blocks(cfg: PagedCacheConfig, runner: RunnerConfig, block_bytes: int, device: torch.device) -> int:
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks
    if cfg.kv_cache_memory_fraction:
        return int(cfg.kv_cache_memory_fraction * available_memory(device)) // block_bytes
    return int(runner.kv_cache_gib * GIB) // block_bytes


def build_paged_runner(lm: LoadedModel, cfg: RunnerConfig, cache_cfg: PagedCacheConfig,
                       explicit_len: bool) -> ModelRunner[PagedKVCache]:
    """The model (step 04's transforms) and a pool of blocks; the context is the model's, or the
    whole pool if that is smaller."""
    return paged_runner(build_model(lm, cfg), lm, cfg, cache_cfg, explicit_len, lm.dtype, model_details(lm, cfg))


def paged_runner(model: Transformer, lm: LoadedModel, cfg: RunnerConfig, cache_cfg: PagedCacheConfig,
                 explicit_len: bool, kv_dtype: torch.dtype,
                 details: Mapping[str, Any] | None = None) -> ModelRunner[PagedKVCache]:
    """A runner over ``model`` (already transformed) with a pool of ``kv_dtype`` blocks."""
    a, bs = model.args, cache_cfg.block_size
    num_blocks = pool_blocks(cache_cfg, cfg, kv_bytes_per_token(a, kv_dtype) * bs, lm.device)
    if num_blocks < 2:
        raise ValueError(f"num_kv_blocks: the KV pool holds {num_blocks} blocks of {bs} tokens; need >= 2")
    max_len = min(lm.max_model_len, num_blocks * bs)
    if explicit_len and max_len < lm.max_model_len:
        raise ValueError(f"max_model_len: {lm.max_model_len} tokens do not fit in the KV pool "
                         f"({num_blocks} blocks of {bs}): raise --kv-cache-gib or lower --max-model-len")
    if max_len < lm.max_model_len:
        log.warning("context cut from %d to %d tokens: the whole KV pool", lm.max_model_len, max_len)
    cache = PagedKVCache.allocate(a.num_layers, num_blocks, bs, a.num_kv_heads, a.head_dim, kv_dtype, lm.device)
    log.info("KV pool: %d blocks of %d tokens (%.2f GiB, %s)", num_blocks, bs, cache.num_bytes / GIB,
             str(kv_dtype).removeprefix("torch."))
    return ModelRunner(model, cache, lm.device, max_len, details)
