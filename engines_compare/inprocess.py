"""Measure the engine in-process: throughput, where step time goes, and what observers cost.

    python -m engines_compare inprocess --model gemma-3-270m --concurrency 1,16 --input-len 128 --output-len 128

Assembles step 04's engine (``EngineCore`` with the contiguous scheduler and runner; with
``--quantization S``, step 08's: paged, the model quantized by scheme ``S``) and drives it
directly (no HTTP): ``concurrency`` greedy requests with ``ignore_eos`` are sent at once and their
token streams read on the event loop, as the API would. An observer records every step's
:class:`StepStats`; the report gives output tokens/s over the whole run, and for the *full decode
steps* (every request decoding, no prefill: the steady state of the benchmark) the mean step
time, model time (``Transformer.forward``) and the overhead ``step - model`` (scheduling,
``build_batch``, sampling, bookkeeping), as a share of model time.

``--observe`` adds step 05's observers (metrics and request log), each wrapped in a timer, and
reports the time spent in their callbacks as a share of the engine thread's step time: both are
timed on the engine thread in the same run, so the share holds even on a busy machine, where two
benchmark runs of the whole server differ by more than the effect.

``--baseline`` also times step 02's path (transformers, one request at a time) in the same
process and prints each ratio to it: a ratio from one run, as the guide asks.

``--handoff`` instead compares the two ways of running a step loop off the event loop, with a
synthetic step (a matmul) and 16 consumers: a dedicated thread posting each step's events with
``loop.call_soon_threadsafe``, and ``await asyncio.to_thread(step)`` per step.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import threading
import time

import torch

from shared.config import ModelConfig
from shared.engine import GenerationRequest, TokenEvent
from shared.models import LoadedModel
from shared.sampling import SamplingParams
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import EngineCore
from step04_kvcache.model_runner import RunnerConfig, build_contiguous_runner
from step04_kvcache.observer import EngineObserver, RequestStats, StepStats
from step04_kvcache.scheduler import ContiguousScheduler, SchedulerConfig
from step05_observability.metrics import EngineMetrics, new_registry
from step05_observability.request_log import RequestLog, json_logger


class Recorder:
    """An observer that keeps everything (fine for a measurement; step 05 aggregates instead)."""

    def __init__(self) -> None:
        self.steps: list[StepStats] = []
        self.requests: list[RequestStats] = []

    def on_step(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def on_request_finished(self, stats: RequestStats) -> None:
        self.requests.append(stats)


class TimedObserver:
    """Forwards to ``inner`` and adds up the time each callback took."""

    def __init__(self, inner: EngineObserver) -> None:
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        self.step_calls, self.step_cb_s, self.step_s = 0, 0.0, 0.0
        self.request_calls, self.request_cb_s = 0, 0.0

    def on_step(self, stats: StepStats) -> None:
        t = time.perf_counter()
        self.inner.on_step(stats)
        self.step_cb_s += time.perf_counter() - t
        self.step_calls += 1
        self.step_s += stats.step_s

    def on_request_finished(self, stats: RequestStats) -> None:
        t = time.perf_counter()
        self.inner.on_request_finished(stats)
        self.request_cb_s += time.perf_counter() - t
        self.request_calls += 1


async def _one_run(eng: AsyncEngine, n: int, input_len: int, output_len: int, seed: int) -> tuple[float, int]:
    rng = random.Random(seed)
    vocab = eng.info().vocab_size

    async def one(i: int) -> int:
        ids = (2, *(rng.randrange(100, vocab) for _ in range(input_len - 1)))
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        request = GenerationRequest(f"m{seed}-{i}", ids, params, time.monotonic())
        return sum([isinstance(e, TokenEvent) async for e in eng.generate(request)])

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*[one(i) for i in range(n)]))
    return time.perf_counter() - t0, tokens


def _report(n: int, wall: float, tokens: int, steps: list[StepStats]) -> None:
    full = [s for s in steps if s.num_prefill_tokens == 0 and s.num_decode_seqs == n]
    print(f"concurrency {n}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} output tok/s, {len(steps)} steps")
    if not full:
        return
    ms = lambda f: 1000 * statistics.mean(f(s) for s in full)  # noqa: E731
    model, step = ms(lambda s: s.model_s), ms(lambda s: s.step_s)
    print(f"  {len(full)} full decode steps (batch {n}): step {step:.2f} ms, model {model:.2f} ms, "
          f"overhead {step - model:.3f} ms = {100 * (step - model) / model:.2f}% of model time")
    print(f"    of which schedule {ms(lambda s: s.schedule_s):.3f} ms, prepare {ms(lambda s: s.prepare_s):.3f} ms, "
          f"sample {ms(lambda s: s.sample_s):.3f} ms, update+hand-off+stats "
          f"{step - model - ms(lambda s: s.schedule_s + s.prepare_s + s.sample_s):.3f} ms")


def _baseline(lm: LoadedModel, input_len: int, output_len: int) -> float:
    """Step 02's path in this process: transformers, one request at a time (its tok/s at any concurrency)."""
    from shared.hf_runner import generate_tokens

    rng = random.Random(-1)
    ids = (2, *(rng.randrange(100, lm.tokenizer.vocab_size) for _ in range(input_len - 1)))
    req = GenerationRequest("baseline", ids, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True),
                            time.monotonic())
    t0 = time.perf_counter()
    n = sum(1 for _ in generate_tokens(lm, req, threading.Event()))
    return n / (time.perf_counter() - t0)


def _observer_report(timed: list[TimedObserver]) -> None:
    steps, step_s = timed[0].step_calls, timed[0].step_s
    step_cb, req_cb = sum(t.step_cb_s for t in timed), sum(t.request_cb_s for t in timed)
    reqs = timed[0].request_calls
    print(f"  on_step: {1e6 * step_cb / max(steps, 1):.0f} us per step (step mean "
          f"{1e3 * step_s / max(steps, 1):.1f} ms); on_request_finished: {1e6 * req_cb / max(reqs, 1):.0f} us "
          f"per request (metrics + JSON line)")
    print(f"  observer callbacks: {1e3 * (step_cb + req_cb):.1f} ms of {step_s:.1f} s of steps = "
          f"{100 * (step_cb + req_cb) / step_s:.3f}% of the engine thread's step time")


def _step08_core(lm: LoadedModel, sched: SchedulerConfig, scheme: str, observers: list) -> EngineCore:
    """Step 08's engine core (paged, ``scheme``'s model) with its default KV pool."""
    from step07_paged_kv.block_manager import BlockManager
    from step07_paged_kv.model_runner import PagedCacheConfig
    from step07_paged_kv.scheduler import PagedScheduler
    from step08_quant import DEFAULT_KV_CACHE_GIB
    from step08_quant.model_runner import build_quant_runner
    from step08_quant.quantize import QuantConfig

    cache_cfg = PagedCacheConfig()
    runner = build_quant_runner(lm, RunnerConfig(kv_cache_gib=DEFAULT_KV_CACHE_GIB), cache_cfg,
                                QuantConfig(quantization=scheme), explicit_len=False)
    blocks = BlockManager(runner.cache.num_blocks, runner.cache.block_size, cache_cfg.enable_prefix_caching)
    return EngineCore(PagedScheduler(sched, runner.max_len, lm.eos_token_ids, blocks), runner, observers=observers)


async def measure(args: argparse.Namespace) -> None:
    rec = Recorder()
    timed = [TimedObserver(EngineMetrics(new_registry())), TimedObserver(RequestLog(json_logger()))]
    sched = SchedulerConfig(max_seqs=max(args.concurrency), max_num_batched_tokens=args.max_num_batched_tokens)
    runner_cfg = RunnerConfig(linear_backend=args.linear_backend)
    loaded: list[LoadedModel] = []

    def build_core(lm: LoadedModel) -> EngineCore:  # step 04's assembly, observed
        loaded.append(lm)
        observers = [rec, *timed] if args.observe else [rec]
        if args.quantization:
            return _step08_core(lm, sched, args.quantization, observers)
        runner = build_contiguous_runner(lm, sched, runner_cfg, explicit_len=False)
        return EngineCore(ContiguousScheduler(sched, runner.max_len, lm.eos_token_ids), runner, observers=observers)

    eng = AsyncEngine(ModelConfig(model=args.model, threads=args.threads), build_core)
    await eng.start()
    print(f"model {args.model}, linear backend {type(eng.core.runner.model.lm_head).__name__}, "
          f"torch threads {torch.get_num_threads()}, "
          f"max_num_batched_tokens {args.max_num_batched_tokens}, {args.input_len} in / {args.output_len} out")
    await _one_run(eng, 2, 16, 4, seed=0)  # warm-up
    base = await asyncio.to_thread(_baseline, loaded[0], args.input_len, args.output_len) if args.baseline else None
    if base:
        print(f"step 02's path (transformers, one request at a time): {base:.2f} output tok/s")
    for n in args.concurrency:
        rec.steps.clear()
        for t in timed:
            t.reset()
        wall, tokens = await _one_run(eng, n, args.input_len, args.output_len, seed=n)
        _report(n, wall, tokens, rec.steps)
        if base:
            print(f"  ratio to step 02's path: {tokens / wall / base:.2f}x")
        if args.observe:
            _observer_report(timed)
    await eng.shutdown()


async def _handoff_once(mode: str, work: object, steps: int, consumers: int) -> float:
    """Seconds per step of ``steps`` steps delivering one event to each of ``consumers`` readers."""
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(consumers)]

    async def consume(q: asyncio.Queue) -> None:
        for _ in range(steps):
            repr(await q.get())  # a little per-event work, as the API's formatting

    def deliver(events: list) -> None:
        for q, e in zip(queues, events):
            q.put_nowait(e)

    def thread_loop() -> None:  # the engine thread: step, post, step, post...
        for i in range(steps):
            work()
            loop.call_soon_threadsafe(deliver, [i] * consumers)

    async def to_thread_loop() -> None:  # a coroutine: each step on the default executor
        for i in range(steps):
            await asyncio.to_thread(work)
            deliver([i] * consumers)

    t0 = time.perf_counter()
    producer = asyncio.to_thread(thread_loop) if mode == "thread" else to_thread_loop()
    await asyncio.gather(producer, *[consume(q) for q in queues])
    return (time.perf_counter() - t0) / steps


async def handoff(steps: int = 300, consumers: int = 16, size: int = 256, rounds: int = 5) -> None:
    a = torch.randn(size, size)
    work = lambda: torch.mm(a, a)  # noqa: E731  (a stand-in for a forward pass)
    times: dict[str, list[float]] = {"alone": [], "thread": [], "to_thread": []}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        t0 = time.perf_counter()
        for _ in range(steps):
            work()
        times["alone"].append((time.perf_counter() - t0) / steps)
        for mode in ("thread", "to_thread"):
            times[mode].append(await _handoff_once(mode, work, steps, consumers))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"work alone: {1000 * med['alone']:.3f} ms per step (median of {rounds} rounds of {steps})")
    for mode in ("thread", "to_thread"):
        print(f"{mode:>9}: {1000 * med[mode]:.3f} ms per step, {1e6 * (med[mode] - med['alone']):+.0f} us "
              f"over the work alone ({consumers} consumers)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engines_compare inprocess", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--concurrency", default="1,16", type=lambda v: [int(x) for x in v.split(",")])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig().max_num_batched_tokens)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--linear-backend", default="auto", choices=("auto", "torch", "onednn"))
    ap.add_argument("--quantization", default="", help="assemble step 08's engine with this scheme instead "
                    "(none, bf16, int8, int4)")
    ap.add_argument("--observe", action="store_true", help="add step 05's observers and report their cost")
    ap.add_argument("--baseline", action="store_true", help="also time step 02's path and print ratios to it")
    ap.add_argument("--handoff", action="store_true", help="compare a dedicated thread with to_thread per step")
    args = ap.parse_args(argv)
    if args.handoff:
        asyncio.run(handoff())
    else:
        asyncio.run(measure(args))


if __name__ == "__main__":
    main()
