"""Step 07's paged runner over the quantized model: ``quantize`` applied when the engine is built.

The scheme (``--quantization``), its activations' dtype and the KV cache's (``--kv-cache-dtype``)
are resolved once against the device (:func:`step08_quant.quantize.plan`), logged, and reported
on ``/health`` and ``/v1/models`` under ``model``. ``none`` is step 07's runner exactly.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from shared.model import Transformer
from shared.models import LoadedModel
from step04_kvcache.model_runner import ModelRunner, RunnerConfig, build_model, model_details
from step07_paged_kv.model_runner import PagedCacheConfig, paged_runner
from step07_paged_kv.paged_cache import PagedKVCache
from step08_quant.quantize import QuantConfig, log, plan, quantized_model, weight_bytes


def build_quant_runner(lm: LoadedModel, cfg: RunnerConfig, cache_cfg: PagedCacheConfig, quant: QuantConfig,
                       explicit_len: bool, shard: Callable[[Transformer], Transformer] | None = None
                       ) -> ModelRunner[PagedKVCache]:
    """``shard`` (step 11) slices the float model first: shard, then quantize."""
    p = plan(quant, lm.device)
    t0 = time.perf_counter()
    if p.scheme == "none":
        model = build_model(lm, cfg, shard)  # step 07's float32 model and linear backend
        details = model_details(lm, cfg)
    else:
        model = Transformer.from_hf_model(lm.model)
        model = quantized_model(shard(model) if shard is not None else model, p)
        details = {"dtype": p.activation_dtype}
    details |= {"quantization": p.scheme, "quantization_group_size": str(p.group_size or ""),
                "kernels": p.kernels, "cpu_flags": " ".join(p.cpu_flags),
                "weight_bytes": str(weight_bytes(model))}
    log.info("model ready in %.1f s (quantization %s)", time.perf_counter() - t0, p.scheme)
    kv = getattr(torch, p.kv_cache_dtype)
    return paged_runner(model, lm, cfg, cache_cfg, explicit_len, kv, details)


