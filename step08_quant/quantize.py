"""``quantize(model, scheme)``: the model transform of step 08, and how the scheme is chosen.

Central rule: a scheme replaces every ``nn.Linear`` of the model (the tied LM head included) by a
module of :mod:`step08_quant.linears` and casts what is left (norms, the embedding) to the
activations' dtype; ``shared/model.py`` never learns which. The float weights are dropped as each
layer is replaced, so the resident model is the quantized one.

* ``none``: step 07's float32 model (oneDNN prepacked linears on CPU).
* ``bf16``: every weight in bfloat16; the linears on oneDNN with prepacked bf16 weights on CPU.
* ``int8``: linears int8 per output channel; the tied embedding gathers its rows from the LM
  head's int8 weight and scales (the same bytes: no second copy of the largest tensor).
* ``int4``: the decoder layers' linears int4 in groups of ``--quantization-group-size`` input
  columns; the LM head stays int8 (and the tied embedding reads it). Measured: with the head in
  int4 too, perplexity rises by 27 % (group 32) to 73 % (group 128) over float32, against a few
  percent with it in int8 (README, "Quality"). The head maps every hidden state onto 262,144
  logits and was stored at 8 bits (Q8_0) in the GGUF; llama.cpp's Q4_K_M also keeps its output
  tensor at higher precision (Q6_K). It costs 84 MB more bytes read per token.

Activations are bfloat16 for every scheme but ``none``: the vectorized int8 / int4 kernels take
bf16 activations only. The KV cache follows (``--kv-cache-dtype auto``).

``auto`` (the default) picks by what the device offers, from the measurements in the README: on a
CPU with avx512_bf16 or AMX, int8 (of the schemes that meet the quality bar, the fastest at 1 and
4 clients and the only one under 2 GB resident; bf16 is faster at 16 clients); on a CPU without
them the bf16 kernels emulate bf16 and float32 is the safe choice (``none``); on CUDA, ``bf16``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch import nn

from shared.config import flag_field
from shared.cpu import cpu_flags
from shared.cpu_linear import OneDNNLinear
from shared.model import Transformer
from step08_quant.linears import INT4_GROUP_SIZES, Bf16Linear, Int4Linear, Int8Linear, QuantEmbedding

log = logging.getLogger("step08_quant")
SCHEMES = ("none", "bf16", "int8", "int4")
DEFAULT_INT4_GROUP_SIZE = 128
CPU_AUTO_SCHEME = "int8"  # measured: README, "Choosing the default"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclasses.dataclass(frozen=True, slots=True)
class QuantConfig:
    quantization: str = flag_field("auto", "weight scheme: none (float32, step 07), bf16, int8 (per output "
                                   "channel), int4 (grouped); auto: the fastest scheme that meets the quality bar "
                                   "on this device (README)", choices=("auto", *SCHEMES))
    quantization_group_size: int = flag_field(0, f"int4: input columns per scale and zero, one of "
                                              f"{INT4_GROUP_SIZES} (0: {DEFAULT_INT4_GROUP_SIZE}); "
                                              "int8 is per output channel and takes 0 only")
    kv_cache_dtype: str = flag_field("auto", "KV cache dtype: auto (the activations': float32 for none, "
                                     "bfloat16 otherwise), float32 or bfloat16",
                                     choices=("auto", "float32", "bfloat16"))

    def __post_init__(self) -> None:
        gs, scheme = self.quantization_group_size, self.quantization
        if gs and scheme != "int4":  # auto too: a group size only means something for int4
            raise ValueError(f"--quantization-group-size: {scheme} has no groups, got {gs} (give 0, or "
                             "--quantization int4)")
        if gs and gs not in INT4_GROUP_SIZES:
            raise ValueError(f"--quantization-group-size: must be one of {INT4_GROUP_SIZES}, got {gs}")


@dataclasses.dataclass(frozen=True, slots=True)
class QuantPlan:
    """What runs: the scheme, its group size, the activation and KV dtypes, the kernel names."""

    scheme: str
    group_size: int | None
    activation_dtype: str
    kv_cache_dtype: str
    kernels: str
    cpu_flags: tuple[str, ...]


def resolve_scheme(cfg: QuantConfig, device: torch.device, flags: tuple[str, ...]) -> str:
    if cfg.quantization != "auto":
        return cfg.quantization
    if device.type == "cuda":
        return "bf16"
    if any(f in flags for f in BF16_FLAGS):
        return CPU_AUTO_SCHEME
    log.warning("quantization auto: this CPU has none of %s; bf16 / int8 / int4 kernels would emulate "
                "bf16, so the model stays float32 (none)", ", ".join(BF16_FLAGS))
    return "none"


KERNELS = {
    ("none", "cpu"): "float32 oneDNN prepacked linears (shared.cpu_linear)",
    ("bf16", "cpu"): "bf16 oneDNN prepacked linears (mkldnn._linear_pointwise)",
    ("int8", "cpu"): "aten._weight_int8pack_mm (int8 weights, bf16 activations)",
    ("int4", "cpu"): "aten._weight_int4pack_mm_for_cpu (int4 weights, bf16 activations)",
    ("none", "cuda"): "float32 F.linear (cuBLAS)",
    ("bf16", "cuda"): "bf16 F.linear (cuBLAS)",
    ("int8", "cuda"): "aten._weight_int8pack_mm (CUDA)",
    ("int4", "cuda"): "aten._weight_int4pack_mm (CUDA tinygemm)",
}


def plan(cfg: QuantConfig, device: torch.device) -> QuantPlan:
    """Resolve ``auto``s against the device and say what will run (logged and served on /health)."""
    flags = cpu_flags()
    scheme = resolve_scheme(cfg, device, flags)
    if scheme == "int8" and device.type == "cpu" and "avx512_bf16" not in flags:
        log.warning("int8 on a CPU without avx512_bf16: the kernel converts activations in software")
    group = (cfg.quantization_group_size or DEFAULT_INT4_GROUP_SIZE) if scheme == "int4" else None
    act = "float32" if scheme == "none" else "bfloat16"
    kv = act if cfg.kv_cache_dtype == "auto" else cfg.kv_cache_dtype
    kernels = KERNELS[(scheme, "cuda" if device.type == "cuda" else "cpu")]
    return QuantPlan(scheme, group, act, kv, kernels, flags)


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))


def quantize(model: Transformer, scheme: str, group_size: int | None = None) -> Transformer:
    """Replace ``model``'s linears (in place) by ``scheme``'s and cast the rest; returns ``model``."""
    if scheme == "none":
        return model
    if scheme not in SCHEMES:
        raise ValueError(f"quantization: must be one of {SCHEMES}, got {scheme!r}")
    tied = model.args.tie_word_embeddings
    cpu = model.lm_head.weight.device.type == "cpu"
    embed_weight = model.embed_tokens.weight
    if scheme == "bf16":
        model.to(torch.bfloat16)  # norms, embedding and linears; a tied head stays the embedding
        if cpu and torch.backends.mkldnn.is_available():
            _replace_linears(model, OneDNNLinear)  # a tied head gets its own packed copy
        return model
    model.lm_head = Int8Linear(model.lm_head.weight, None)  # int8 in both schemes (int4: see the docstring)
    if scheme == "int8":
        make = lambda lin: Int8Linear(lin.weight, lin.bias)  # noqa: E731
    else:
        gs = group_size or DEFAULT_INT4_GROUP_SIZE
        make = lambda lin: Int4Linear(lin.weight, lin.bias, gs)  # noqa: E731
    _replace_linears(model.layers, make)
    # A tied embedding gathers the head's int8 rows (the same bytes); an untied one gets its own.
    model.embed_tokens = QuantEmbedding(model.lm_head if tied else Int8Linear(embed_weight, None))
    del embed_weight
    model.to(torch.bfloat16)  # what is left: the norms
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and tensor the model's modules hold (each tensor counted once)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False),
                  *(v for v in vars(m).values() if isinstance(v, torch.Tensor))]:
            key = id(t) if t.is_mkldnn else t.data_ptr()  # oneDNN's packed tensors have no data pointer
            seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


def quantized_model(model: Transformer, p: QuantPlan) -> Transformer:
    """``quantize`` by the plan, with a log line of what was chosen and what it weighs."""
    model = quantize(model, p.scheme, p.group_size)
    log.info("quantization %s%s: %s; activations %s, KV cache %s; CPU flags: %s; weights %.0f MB",
             p.scheme, f" (group {p.group_size})" if p.group_size else "", p.kernels, p.activation_dtype,
             p.kv_cache_dtype, " ".join(p.cpu_flags) or "none", weight_bytes(model) / 1e6)
    return model
