"""Measure what observation costs the engine thread: time in step 05's callbacks ÷ time in steps.

    python -m step05_observability.measure --model gemma-3-270m --concurrency 16 --input-len 128 --output-len 128

Runs an :class:`ObservedEngine` in-process (step 04's measurement load: ``concurrency`` greedy
``ignore_eos`` requests at once) with its observer wrapped in a timer. Both the callbacks and the
steps are timed on the engine thread in the same run, so the share holds even on a busy machine,
where two benchmark runs of the whole server differ by more than the effect.
"""
from __future__ import annotations

import argparse
import asyncio
import time

from shared.config import ModelConfig
from step04_kvcache.measure import _one_run
from step04_kvcache.observer import EngineObserver, RequestStats, StepStats
from step05_observability.engine import ObservedEngine


class TimedObserver:
    """Forwards to ``inner`` and adds up the time each callback took."""

    def __init__(self, inner: EngineObserver) -> None:
        self.inner = inner
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


async def measure(args: argparse.Namespace) -> None:
    eng = ObservedEngine(ModelConfig(model=args.model, threads=args.threads))
    timer = TimedObserver(eng.observer)
    eng.observer = timer  # the engine thread calls whatever self.observer is
    await eng.start()
    try:
        await _one_run(eng, 2, 16, 4, seed=0)  # warm-up
        timer.__init__(timer.inner)
        wall, tokens = await _one_run(eng, args.concurrency, args.input_len, args.output_len, seed=1)
    finally:
        await eng.shutdown()
    cb = timer.step_cb_s + timer.request_cb_s
    print(f"{args.model}, concurrency {args.concurrency}, {args.input_len} in / {args.output_len} out: "
          f"{tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} output tok/s, {timer.step_calls} steps")
    print(f"  on_step: {1e6 * timer.step_cb_s / max(timer.step_calls, 1):.0f} us per step "
          f"(step mean {1e3 * timer.step_s / max(timer.step_calls, 1):.1f} ms); on_request_finished: "
          f"{1e6 * timer.request_cb_s / max(timer.request_calls, 1):.0f} us per request (metrics + JSON line)")
    print(f"  observer callbacks: {1e3 * cb:.1f} ms of {timer.step_s:.1f} s of steps = "
          f"{100 * cb / timer.step_s:.3f}% of the engine thread's step time")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    asyncio.run(measure(p.parse_args()))


if __name__ == "__main__":
    main()
