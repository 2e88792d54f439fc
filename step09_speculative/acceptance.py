"""Which draft, and how many tokens: measured, per candidate, on the served (int8) model.

    python -m step09_speculative.acceptance [--model gemma-3-270m] [--layers 2,4,6,9,12] [--windows 8]

Three measurements, then a projection:

* **Verification cost** ``v(B, k)``: the time of one forward of ``B`` sequences feeding ``1 + k``
  tokens each (context 256), over the time of the same batch feeding 1 token (a plain decode step).
  On a GPU this is ~1 for small ``k``; on a CPU the matmuls' cost grows with the rows.
* **Draft cost** ``c``: the time of one draft forward (batch 1, one token) over the target's.
* **Acceptance** ``a``: how often the draft's argmax equals the target's, teacher-forced on held
  corpus text (greedy acceptance per position). The int4 copy is run here over its own K/V; served,
  it reads the target's (``draft.py``), so the server's acceptance (``/metrics``) is the one to quote.

Projection (greedy, independent positions): a step proposing ``k`` tokens emits
``1 + a + a^2 + ... + a^k`` tokens and costs ``k c + v(1, k)`` plain steps, so the speed-up at one
client is their ratio. n-gram drafts cost nothing (``c = 0``); their acceptance depends on the text
(the README measures it end to end on the grounded workload).
"""
from __future__ import annotations

import argparse

import torch

from shared.attention import build_batch
from shared.config import ModelConfig
from shared.cpu import cpu_flags
from shared.model import Transformer
from shared.models import load_model, prepare
from step07_paged_kv.paged_cache import PagedKVCache
from step08_quant.kernels import time_ms
from step08_quant.quality import held_windows
from step08_quant.quantize import quantize
from step09_speculative.draft import early_exit

BLOCK = 16


class Bench:
    """A model over a cache of ``seqs`` sequences of ``max_len`` positions each."""

    def __init__(self, model: Transformer, seqs: int, max_len: int) -> None:
        a, per = model.args, -(-max_len // BLOCK)
        self.model, self.per = model, per
        self.cache = PagedKVCache.allocate(a.num_layers, seqs * per, BLOCK, a.num_kv_heads, a.head_dim, torch.bfloat16)

    @torch.inference_mode()
    def forward(self, tokens: list[list[int]], context: list[int]) -> torch.Tensor:
        tables = [list(range(i * self.per, (i + 1) * self.per)) for i in range(len(tokens))]
        b = build_batch(tokens, context, tables, BLOCK, decode_query_len=max(map(len, tokens)))
        return self.model(b.input_ids, b.positions, self.cache, b.attn_metadata, None).float()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m step09_speculative.acceptance", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--layers", default="2,4,6,9,12", help="early-exit drafts to measure")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    ns = p.parse_args(argv)
    cfg = ModelConfig(model=ns.model, dtype="float32")
    prepare(cfg)
    lm = load_model(cfg)
    windows = held_windows(lm.tokenizer, ns.windows, ns.window_len)
    target = quantize(Transformer.from_hf_model(lm.model), "int8")
    drafts = {f"early exit {n}": early_exit(target, n) for n in map(int, ns.layers.split(","))}
    drafts["int4 copy"] = quantize(Transformer.from_hf_model(lm.model), "int4", 32)
    print(f"{ns.model}, target int8; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU flags: {' '.join(cpu_flags()) or 'none'}")
    ctx = 256
    bench = Bench(target, 16, ctx + 32)
    for b_ in (1, 4, 16):
        base = time_ms(lambda: bench.forward([[5]] * b_, [ctx] * b_), ns.repeats)
        ks = (1, 2, 3, 4, 7)
        ratios = [time_ms(lambda: bench.forward([[5] * (1 + k)] * b_, [ctx] * b_), ns.repeats) / base for k in ks]
        print(f"verification, batch {b_}: plain step {base:.1f} ms; 1 + k tokens each costs "
              + ", ".join(f"k={k}: x{r:.2f}" for k, r in zip(ks, ratios)))
    t_target = time_ms(lambda: bench.forward([[5]], [ctx]), ns.repeats)
    v1 = {k: time_ms(lambda: bench.forward([[5] * (1 + k)], [ctx]), ns.repeats) / t_target for k in range(1, 8)}
    print("| draft | acceptance (top-1 agreement) | cost per token vs target | best k | projected speed-up |")
    print("|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        ref = [bench.forward([w], [0]).argmax(-1) for w in windows]
        for name, d in drafts.items():
            db = Bench(d, 1, ctx + 32)
            agree = sum(int((db.forward([w], [0]).argmax(-1) == r).sum()) for w, r in zip(windows, ref))
            a = agree / sum(len(w) for w in windows)
            c = time_ms(lambda: db.model(*_one(db, ctx)), ns.repeats) / t_target
            best = max(range(1, 8), key=lambda k: sum(a ** i for i in range(k + 1)) / (k * c + v1[k]))
            speed = sum(a ** i for i in range(best + 1)) / (best * c + v1[best])
            print(f"| {name} | {100 * a:.1f} % | {c:.2f} | {best} | x{speed:.2f} |")


def _one(b: Bench, ctx: int) -> tuple:
    x = build_batch([[5]], [ctx], [list(range(b.per))], BLOCK)
    return x.input_ids, x.positions, b.cache, x.attn_metadata, None


if __name__ == "__main__":
    main()
