"""Where a decode step's time goes, eager (step 09) against compiled (step 10), in one process.

    python -m step10_kernels.profile --model gemma-3-270m --batches 1,16 [--quantization int8]

Builds step 09's runner (``--kernels torch``) and step 10's (``--kernels compile``) on the same
loaded model, prefills each batch sequence with ``--context`` tokens, then times full decode steps
(``ModelRunner.forward``: plans, layers, LM head) alternately, three rounds, best of each, and
prints the ratio; then a torch.profiler breakdown of each (ms per step by op: the matmuls, the
attention, the rest, and the Python / dynamo entry costs). No HTTP, no sampling: the model only.
With ``--engine-clients 1,16`` it then drives the whole engine core (scheduler, runner, sampler;
still no HTTP) with that many concurrent requests on each path: the server's cost is the
difference from ``bench``'s figures.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from shared.attention import build_batch
from shared.config import ModelConfig
from shared.cpu import cpu_flags
from shared.models import load_model
from step04_kvcache.model_runner import ModelRunner, RunnerConfig
from step07_paged_kv.model_runner import PagedCacheConfig
from step08_quant.model_runner import build_quant_runner
from step08_quant.quantize import QuantConfig
from step10_kernels.gpu_bench import engine_tok_s
from step10_kernels.model_runner import KernelsConfig, kernels_runner

GROUPS = {"matmul": ("linear_pointwise", "aten::mm", "aten::addmm", "int8pack_mm", "int4pack_mm"),
          "attention": ("index_select", "scaled_dot_product", "index_copy"),
          "dynamo/compiled-graph entry": ("Torch-Compiled Region", "TorchDynamo Cache Lookup", "Pregraph bytecode",
                                          "CompiledFxGraph", "AOTDispatcher", "stepserve::")}


def decode_inputs(runner: ModelRunner, batch: int, context: int) -> tuple:
    bs = runner.cache.block_size
    per = -(-(context + 2) // bs)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(batch)]
    prefill = build_batch([[5 + i] * context for i in range(batch)], [0] * batch, tables, bs, runner.device)
    return prefill, build_batch([[7]] * batch, [context] * batch, tables, bs, runner.device)


def step_ms(runner: ModelRunner, inputs: object, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        runner.forward(inputs)
    return (time.perf_counter() - t0) / iters * 1e3


def breakdown(runner: ModelRunner, inputs: object, iters: int = 5) -> dict[str, float]:
    with torch.profiler.profile() as prof:
        for _ in range(iters):
            runner.forward(inputs)
    groups: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        name = next((g for g, keys in GROUPS.items() if any(k in e.key for k in keys)), "other ops")
        groups[name] += e.self_cpu_time_total / iters / 1e3
    groups["total"] = sum(groups.values())
    return dict(groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--batches", default="1,16", type=lambda v: [int(x) for x in v.split(",")])
    ap.add_argument("--context", type=int, default=192, help="tokens in each sequence's cache (128 in + 64 out)")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--engine-clients", default="", type=lambda v: [int(x) for x in v.split(",") if x],
                    help="also drive the engine (scheduler, runner, sampler; no HTTP) with this many concurrent "
                         "requests of 128 prompt and 128 output tokens (bench's default), each path, e.g. 1,16")
    ns = ap.parse_args()
    lm = load_model(ModelConfig(model=ns.model))
    blocks = max(ns.batches + ns.engine_clients) * (-(-max(ns.context + 2, 256) // 16) + 1) + 2
    build = lambda cfg: build_quant_runner(lm, cfg, PagedCacheConfig(num_kv_blocks=blocks), QuantConfig(ns.quantization), False)  # noqa: E731
    runners = {k: kernels_runner(lm, RunnerConfig(), KernelsConfig(kernels=k), build) for k in ("torch", "compile")}
    print(f"model {ns.model}, quantization {ns.quantization}, {torch.get_num_threads()} threads, cpu flags "
          f"{' '.join(cpu_flags())}; compile warm-up {runners['compile'].details['compile_s']} s")
    with torch.inference_mode():
        for batch in ns.batches:
            times: dict[str, list[float]] = {k: [] for k in runners}
            steps = {k: decode_inputs(r, batch, ns.context) for k, r in runners.items()}
            for k, r in runners.items():
                r.forward(steps[k][0])  # prefill the context
            for _ in range(3):
                for k, r in runners.items():
                    times[k].append(step_ms(r, steps[k][1], ns.iters))
            best = {k: min(v) for k, v in times.items()}
            print(f"batch {batch}: decode step eager {best['torch']:.1f} ms, compiled {best['compile']:.1f} ms, "
                  f"eager / compiled x{best['torch'] / best['compile']:.2f}")
            for k, r in runners.items():
                parts = breakdown(r, steps[k][1])
                print(f"  {k:8s} " + ", ".join(f"{g} {v:.1f}" for g, v in sorted(parts.items(), key=lambda x: -x[1])))
    for clients in ns.engine_clients:  # over the same runners: the compiled one compiles nothing more
        tok_s = {k: engine_tok_s(lm, r, clients, 128, 128) for k, r in runners.items()}
        print(f"engine, {clients} clients, 128 in / 128 out: eager {tok_s['torch']:.1f} tok/s, "
              f"compiled {tok_s['compile']:.1f}, x{tok_s['compile'] / tok_s['torch']:.2f}")


if __name__ == "__main__":
    main()
