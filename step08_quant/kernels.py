"""Measure every candidate linear kernel on the model's real shapes before choosing one.

    python -m step08_quant.kernels [--model gemma-3-270m] [--rows 1,4,16,64] [--repeat 20]

For each scheme and batch size ``M`` it times the linears of ONE forward (every layer's q, k, v,
o, gate, up, down, and the LM head) on random weights of the model's shapes, and the LM head
alone, in milliseconds (median of ``--repeat``). Candidates: float32 ``F.linear`` (MKL),
float32 oneDNN prepacked (step 07's default), bfloat16 ``F.linear`` (oneDNN), bfloat16 oneDNN
prepacked, int8 ``_weight_int8pack_mm``, int4 ``_weight_int4pack_mm_for_cpu`` per group size.
The CPU flags are printed with the table: these kernels differ by what the CPU offers.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from shared.cpu_linear import OneDNNLinear
from shared.cpu import cpu_flags
from step08_quant.linears import Bf16Linear, Int4Linear, Int8Linear


def model_shapes(model: str) -> tuple[list[tuple[int, int]], tuple[int, int], int]:
    """``([(out, in)] of one layer's linears, (vocab, hidden) of the head, layers)`` from the config."""
    from transformers import AutoConfig

    from shared.config import ModelConfig
    from shared.models import TINY_ALIASES, prepare, resolve_path
    from shared.tiny import tiny_config

    if model in TINY_ALIASES:
        cfg = tiny_config(model)
    else:
        prepare(ModelConfig(model=model))
        cfg = AutoConfig.from_pretrained(resolve_path(model))
    cfg = getattr(cfg, "text_config", cfg)
    h, i = cfg.hidden_size, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)], (cfg.vocab_size, h), cfg.num_hidden_layers


def candidates() -> dict[str, Callable[[torch.Tensor], nn.Module]]:
    def linear(w: torch.Tensor) -> nn.Linear:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight = nn.Parameter(w, requires_grad=False)
        return lin

    out: dict[str, Callable[[torch.Tensor], nn.Module]] = {
        "float32 F.linear": linear,
        "float32 onednn": lambda w: OneDNNLinear(linear(w)),
        "bf16 F.linear": lambda w: Bf16Linear(w, None),
        "bf16 onednn": lambda w: OneDNNLinear(linear(w.bfloat16())),
        "int8 per-channel": lambda w: Int8Linear(w, None),
    }
    for gs in (32, 64, 128):
        out[f"int4 g{gs}"] = lambda w, gs=gs: Int4Linear(w, None, gs)
    return out


def time_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m step08_quant.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--rows", default="1,4,16,64", help="batch sizes M, comma-separated")
    p.add_argument("--repeat", type=int, default=20)
    ns = p.parse_args(argv)
    rows = [int(r) for r in ns.rows.split(",")]
    layer, head, num_layers = model_shapes(ns.model)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {' '.join(cpu_flags()) or 'none'}")
    print(f"model {ns.model}: {num_layers} layers x {layer}, head {head}; ms per forward (median of {ns.repeat})")
    print(f"| scheme | {' | '.join(f'all linears M={m}' for m in rows)} | {' | '.join(f'head M={m}' for m in rows)} |")
    print("|---|" + "---:|" * (2 * len(rows)))
    for name, make in candidates().items():
        try:
            mods = [make(torch.randn(n, k) * 0.02) for n, k in layer]
            lm = make(torch.randn(*head) * 0.02)
        except (RuntimeError, ValueError) as e:
            print(f"| {name} | unavailable: {e} |")
            continue
        dtype = torch.float32 if name.startswith("float32") else torch.bfloat16
        cells, heads = [], []
        for m in rows:
            xs = {k: torch.randn(m, k, dtype=dtype) for _, k in (*layer, head)}
            t_layer = time_ms(lambda: [mod(xs[mod_k]) for mod, (_, mod_k) in zip(mods, layer)], ns.repeat)
            t_head = time_ms(lambda: lm(xs[head[1]]), max(3, ns.repeat // 4))
            cells.append(f"{num_layers * t_layer + t_head:.1f}")
            heads.append(f"{t_head:.1f}")
        print(f"| {name} | {' | '.join(cells)} | {' | '.join(heads)} |", flush=True)


if __name__ == "__main__":
    main()
