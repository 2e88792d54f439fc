"""What tensor parallelism costs on this machine: collective latencies, and a decode step's time
spent communicating, for one rank against two.

    python -m step11_multigpu.comm --model gemma-3-270m --batches 1,16

Three parts, one run (every rank pinned to its own core, as the server pins them):

1. **gloo's latency**, two ranks: an all-reduce of ``[T, hidden]`` float32 (what each row-parallel
   layer sends, T tokens) and the gather of ``[T, vocab / 2]`` logits on rank 0, median of many.
2. **the model, two ranks**: step 11's runner (rank 0 sending each batch to the worker, as the
   server does) times decode steps of each batch size, and torch.profiler on rank 0 sums the time
   inside the collectives (``stepserve::tp_all_reduce``, the logits gather): the time per step and
   per token spent communicating, waiting for the other rank included.
3. **the model, one rank** with as many threads as the two ranks had cores: the same steps.

No HTTP, no sampling: the serving figures come from ``bench`` (README).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.config import ModelConfig
from shared.cpu import cpu_flags
from shared.models import load_config, load_model, prepare
from step04_kvcache.model_runner import RunnerConfig
from step07_paged_kv.model_runner import PagedCacheConfig
from step08_quant.kernels import time_ms
from step08_quant.quantize import QuantConfig
from step10_kernels.model_runner import KernelsConfig
from step10_kernels.profile import decode_inputs
from step11_multigpu.executor import TPRunner, Workers, join_group
from step11_multigpu.model_runner import RankSpec, assign_cores, build_rank_runner, pin

COMM_OPS = ("tp_all_reduce", "gather")


def _latency(rank: int, spec: RankSpec, shapes: list[tuple[int, int]], vocab: int, iters: int, out: mp.Queue) -> None:
    pin(spec, rank)
    join_group(spec, rank)
    result = {}
    for t, hidden in shapes:
        x = torch.randn(t, hidden)
        result[f"all-reduce [{t}, {hidden}]"] = 1000 * time_ms(lambda: dist.all_reduce(x), iters)
        part = torch.randn(t, vocab // 2)
        parts = [torch.empty_like(part) for _ in range(2)] if rank == 0 else None
        result[f"gather [{t}, {vocab // 2}]"] = 1000 * time_ms(lambda: dist.gather(part, parts, dst=0), iters)
    dist.barrier()
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def collective_latency(spec: RankSpec, hidden: int, vocab: int, batches: list[int], iters: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    spec = dataclasses.replace(spec, init_method=f"file://{tempfile.mkdtemp()}/latency")
    shapes = [(t, hidden) for t in batches]
    procs = [ctx.Process(target=_latency, args=(r, spec, shapes, vocab, iters, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join(30)
    return result


def decode_profile(runner, batch: int, context: int, iters: int) -> tuple[float, float]:
    """Median decode step ms, and ms per step inside the collectives (rank 0's profiler)."""
    prefill, decode = decode_inputs(runner, batch, context)
    runner.forward(prefill)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.forward(decode)
        times.append(time.perf_counter() - t0)
    with torch.profiler.profile() as prof:
        for _ in range(5):
            runner.forward(decode)
    comm_us = sum(e.cpu_time_total for e in prof.key_averages() if any(k in e.key for k in COMM_OPS))
    return statistics.median(times) * 1e3, comm_us / 5 / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--kernels", default="compile", choices=("torch", "compile"))
    p.add_argument("--iters", type=int, default=20)
    ns = p.parse_args()
    batches = [int(b) for b in ns.batches.split(",")]
    model_cfg = ModelConfig(model=ns.model)
    prepare(model_cfg)
    config = load_config(model_cfg)
    cores = tuple(sorted(os.sched_getaffinity(0)))
    spec = RankSpec(model=dataclasses.replace(model_cfg, device="cpu", threads=len(cores) // 2),
                    runner=RunnerConfig(), cache=PagedCacheConfig(num_kv_blocks=max(batches) * (ns.context // 16 + 2)),
                    quant=QuantConfig(quantization="none"), kernels=KernelsConfig(kernels=ns.kernels),
                    explicit_len=False, world_size=2, cores=assign_cores(2, 0, cores),
                    init_method=f"file://{tempfile.mkdtemp()}/rendezvous", timeout_s=300)
    print(f"{ns.model}, float32, kernels {ns.kernels}; torch {torch.__version__}; cores {cores}; "
          f"CPU flags: {' '.join(cpu_flags()) or 'none'}")

    print("\n1. gloo, 2 ranks x 1 core: median latency (us)")
    for name, us in collective_latency(spec, config.hidden_size, config.vocab_size, batches, 200).items():
        print(f"   {name:32s} {us:9.1f}")

    print("\n2. the model on 2 ranks (rank 0 sends each batch to the worker): decode step")
    pin(spec, 0)
    workers = Workers(spec)
    workers.expect("hello")
    join_group(spec, 0)
    lm = load_model(spec.model)
    runner = TPRunner(build_rank_runner(lm, spec, 0), workers)
    workers.expect("ready")
    two = {}
    with torch.inference_mode():
        for b in batches:
            two[b] = decode_profile(runner, b, ns.context, ns.iters)
            step, comm = two[b]
            print(f"   batch {b:3d}: {step:7.1f} ms a step, {comm:6.1f} ms in collectives ({comm / step:4.0%}), "
                  f"{comm / b:6.2f} ms per token")
    runner.close()

    print(f"\n3. the model on 1 rank x {len(cores)} threads (a fresh process): decode step")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    one_spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, threads=len(cores)), world_size=1,
                                   cores=(cores,))
    proc = ctx.Process(target=_one_rank, args=(one_spec, batches, ns.context, ns.iters, out))
    proc.start()
    one = out.get(timeout=1200)
    proc.join(30)
    for b in batches:
        print(f"   batch {b:3d}: {one[b]:7.1f} ms a step; 2 ranks / 1 rank: x{one[b] / two[b][0]:.2f} speed")


def _one_rank(spec: RankSpec, batches: list[int], context: int, iters: int, out: mp.Queue) -> None:
    pin(spec, 0)
    runner = build_rank_runner(load_model(spec.model), spec, 0)
    with torch.inference_mode():
        out.put({b: decode_profile(runner, b, context, iters)[0] for b in batches})

if __name__ == "__main__":
    main()
