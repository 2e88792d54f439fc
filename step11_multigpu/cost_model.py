"""What tensor parallelism costs and saves per decode step, as arithmetic (printed as the README's table).

    python -m step11_multigpu.cost_model                  # H200s with NVLink, published figures
    python -m step11_multigpu.cost_model --tp1-step-ms X  # start from a measured one-GPU step

A decode step of ``B`` sequences on ``n`` ranks costs

    t(n) = t_fixed + (weight bytes / n + KV bytes / n_kv) / (HBM bandwidth x efficiency) + t_comm(n)
    t_comm(n) = (2 L + 1) x (alpha(n) + 2 (n - 1) / n x B x hidden x 2 bytes / link bandwidth)
              + alpha(n) + (n - 1) / n x B x vocab x 2 bytes / link bandwidth     (the logits gather)
    alpha(n)  = alpha x log2(n)     (a latency-bound collective takes log2(n) rounds: recursive doubling)

- ``2 L + 1`` all-reduces: two per layer (after ``o_proj`` and ``down_proj``), one for the
  vocabulary-parallel embedding; each carries ``B x hidden`` activations (bf16 on a GPU).
- The weights split n ways; the KV cache splits by KV heads, ``n_kv = min(n, KV heads)`` (Gemma 3
  270M has one KV head: every rank reads all of it).
- ``t_fixed``: what a step costs whatever the split (scheduling, sampling, launching the graph).

TP pays while the weight and KV time it takes off a step exceeds the all-reduce time it adds:
going from n to 2n saves ``t_mem(n) / 2`` and costs the extra communication.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

BF16 = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o; k, v
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden  # the LM head (tied or not, it is read every step)


GEMMA_270M = Shape("Gemma 3 270M", 18, 640, 2048, 4, 1, 256, 262_144, True)
LLAMA_7B = Shape("Llama 2 7B (shape)", 32, 4096, 11_008, 32, 32, 128, 32_000, False)


@dataclasses.dataclass(frozen=True, slots=True)
class Machine:
    """Per GPU. Defaults: H200 (HBM3e 4.8 TB/s; NVLink 4, 900 GB/s both ways = 450 each way)."""

    hbm_gbs: float = 4800.0
    efficiency: float = 0.8  # of peak HBM bandwidth a decode step's reads reach
    link_gbs: float = 450.0
    allreduce_us: float = 8.0  # a small all-reduce's latency on 2 GPUs (NCCL on NVSwitch: several microseconds)
    fixed_ms: float = 1.0  # per step, whatever n


@dataclasses.dataclass(frozen=True, slots=True)
class StepCost:
    n: int
    mem_ms: float
    comm_ms: float
    total_ms: float
    batch: int

    @property
    def tok_s(self) -> float:
        return self.batch / self.total_ms * 1e3


def step_cost(s: Shape, n: int, batch: int, context: int, m: Machine) -> StepCost:
    weights = (s.layer_params + s.head_params) * BF16 / n
    kv = batch * context * s.layers * 2 * s.kv_heads * s.head_dim * BF16 / min(n, s.kv_heads)
    mem_ms = (weights + kv) / (m.hbm_gbs * 1e9 * m.efficiency) * 1e3
    comm_ms = 0.0
    if n > 1:
        link, alpha = m.link_gbs * 1e9, m.allreduce_us * 1e-6 * math.log2(n)
        reduce_ms = (alpha + 2 * (n - 1) / n * batch * s.hidden * BF16 / link) * 1e3
        gather_ms = (alpha + (n - 1) / n * batch * s.vocab * BF16 / link) * 1e3
        comm_ms = (2 * s.layers + 1) * reduce_ms + gather_ms
    return StepCost(n, mem_ms, comm_ms, m.fixed_ms + mem_ms + comm_ms, batch)


def table(shapes: tuple[Shape, ...], batches: tuple[int, ...], context: int, m: Machine) -> str:
    rows = ["| model | batch | TP | weights+KV ms | all-reduces ms | step ms | tok/s | speed-up | per GPU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in shapes:
        for b in batches:
            base = step_cost(s, 1, b, context, m)
            for n in (1, 2, 4, 8):
                c = step_cost(s, n, b, context, m)
                up = base.total_ms / c.total_ms
                rows.append(f"| {s.name} | {b} | {n} | {c.mem_ms:.2f} | {c.comm_ms:.2f} | {c.total_ms:.2f} | "
                            f"{c.tok_s:,.0f} | x{up:.2f} | {up / n:.0%} |")
    return "\n".join(rows)


def break_even(s: Shape, batch: int, context: int, m: Machine) -> int:
    """The largest n (a power of two, up to 64) whose step beats n / 2's: where TP stops paying."""
    n = 1
    while n < 64 and step_cost(s, 2 * n, batch, context, m).total_ms < step_cost(s, n, batch, context, m).total_ms:
        n *= 2
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Machine()
    for f in dataclasses.fields(Machine):
        p.add_argument("--" + f.name.replace("_", "-"), type=float, default=getattr(d, f.name))
    p.add_argument("--context", type=int, default=1024, help="tokens each sequence has in its KV cache")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--tp1-step-ms", type=float, default=0.0,
                   help="a measured one-GPU step of Gemma 3 270M at batch 1: sets fixed-ms to it minus the weight time")
    ns = p.parse_args()
    m = Machine(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(Machine)})
    batches = tuple(int(b) for b in ns.batches.split(","))
    if ns.tp1_step_ms:
        m = dataclasses.replace(m, fixed_ms=ns.tp1_step_ms - step_cost(GEMMA_270M, 1, 1, ns.context, m).mem_ms)
    print(f"{m}; context {ns.context} tokens, bf16\n")
    print(table((GEMMA_270M, LLAMA_7B), batches, ns.context, m))
    for s in (GEMMA_270M, LLAMA_7B):
        for b in batches:
            print(f"\n{s.name}, batch {b}: a step is fastest at TP = {break_even(s, b, ns.context, m)}")


if __name__ == "__main__":
    main()
