"""Step 04's engine in-process: exact under any batch and arrival order, cache = recompute,
one sampler call per step, cancellation within a step, the observer hook, failures contained."""
from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from shared.config import ModelConfig
from shared.engine import GenerationRequest
from shared.errors import RequestError
from shared.sampling import SamplingParams
from shared.tiny import TINY_SLIDING_WINDOW
from step04_kvcache import engine_core as engine_module
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import EngineCore
from step04_kvcache.model_runner import RunnerConfig, build_contiguous_runner, resolve_linear_backend
from step04_kvcache.observer import RequestStats, StepStats
from step04_kvcache.scheduler import ContiguousScheduler, SchedulerConfig
from tests.helpers import reference_greedy, reference_model

TINY = ("tiny-llama", "tiny-gemma3")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recorder:
    def __init__(self) -> None:
        self.steps: list[StepStats] = []
        self.requests: dict[str, RequestStats] = {}

    def on_step(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def on_request_finished(self, stats: RequestStats) -> None:
        self.requests[stats.request_id] = stats


def make(model: str = "tiny-gemma3", max_seqs: int = 4, budget: int = 16, max_model_len: int = 0,
         gib: float = 1.0, backend: str = "auto") -> tuple[AsyncEngine, Recorder]:
    """Step 04's assembly (its ``__main__``), with a recording observer."""
    rec = Recorder()
    sched = SchedulerConfig(max_seqs=max_seqs, max_num_batched_tokens=budget)

    def build_core(lm) -> EngineCore:
        runner = build_contiguous_runner(lm, sched, RunnerConfig(gib, backend), explicit_len=max_model_len > 0)
        return EngineCore(ContiguousScheduler(sched, runner.max_len, lm.eos_token_ids), runner, observers=[rec])

    return AsyncEngine(ModelConfig(model=model, max_model_len=max_model_len), build_core), rec


def greq(rid: str, ids: list[int], max_tokens: int, **kw: object) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, "ignore_eos": True, **kw})
    return GenerationRequest(rid, tuple(ids), params, time.monotonic())


async def collect(eng: AsyncEngine, req: GenerationRequest, delay: float = 0.0) -> list:
    await asyncio.sleep(delay)
    return [e async for e in eng.generate(req)]


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [2, *(rng.randrange(6, 262) for _ in range(n - 1))]


@pytest.mark.parametrize(("model", "backend"), [("tiny-llama", "auto"), ("tiny-gemma3", "auto"),
                                               ("tiny-gemma3", "torch")])
def test_every_request_equals_batch1_transformers_whatever_the_batch_and_arrival(model: str, backend: str) -> None:
    """Mixed prompt lengths (up to 3x the token budget, past the sliding window), seeded random
    arrivals, fewer rows than requests, some stopping at EOS: each equals its batch-1 reference,
    with either linear backend."""
    rng = random.Random(f"arrivals-{model}")
    jobs = [(f"r{i}", random_prompt(rng, rng.choice([1, 3, 9, 17, 30, 50])), rng.randint(1, 40),
             rng.random() < 0.3, rng.random() * 0.15) for i in range(12)]
    eng, rec = make(model, max_seqs=4, budget=16, backend=backend)

    async def run() -> list[list]:
        await eng.start()
        try:
            return await asyncio.gather(*[collect(eng, greq(rid, ids, n, ignore_eos=not eos), delay)
                                          for rid, ids, n, eos, delay in jobs])
        finally:
            await eng.shutdown()

    results = asyncio.run(run())
    assert type(eng.core.runner.model.lm_head).__name__ == ("Linear" if backend == "torch" else "OneDNNLinear")
    for (rid, ids, n, eos, _), events in zip(jobs, results):
        ref = reference_greedy(model, ids, n, stop_at_eos=eos)[0]
        assert [e.token_id for e in events] == ref, f"{model} {rid}: prompt {len(ids)}, max_tokens {n}"
        assert events[-1].finish_reason == ("stop" if len(ref) < n else "length")
    # The run really mixed: decodes beside prompt chunks, prompts cut by the budget, full budgets.
    assert any(s.num_decode_seqs and s.num_prefill_tokens for s in rec.steps)
    assert any(s.num_sampled < s.batch_size for s in rec.steps)
    assert max(s.num_batched_tokens for s in rec.steps) == 16


def test_cached_decoding_equals_full_recompute_past_the_window_in_a_reused_row() -> None:
    """The engine's log-probabilities of its own tokens equal one full forward over the whole
    sequence (no cache), for a sequence that decodes 3x past the window in a row another
    sequence used before it, while other sequences share its batches."""
    model = "tiny-gemma3"
    rng = random.Random(5)
    eng, _ = make(model, max_seqs=2, budget=8)
    prompt = random_prompt(rng, 10)

    async def run() -> list:
        await eng.start()
        await collect(eng, greq("before", random_prompt(rng, 60), 30))  # dirties row 0
        main = collect(eng, greq("main", prompt, 3 * TINY_SLIDING_WINDOW, logprobs=0))
        other = collect(eng, greq("other", random_prompt(rng, 25), 30), delay=0.01)
        got, _ = await asyncio.gather(main, other)
        await eng.shutdown()
        return got

    events = asyncio.run(run())
    tokens = [e.token_id for e in events]
    with torch.inference_mode():
        logits = reference_model(model).model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    full = torch.log_softmax(logits.float(), dim=-1)
    assert tokens == full.argmax(-1).tolist()
    served = torch.tensor([e.logprob for e in events])
    torch.testing.assert_close(served, full[torch.arange(len(tokens)), tokens], atol=5e-4, rtol=0)


def test_seeded_sampling_in_a_batch_equals_sampling_alone() -> None:
    eng, _ = make(max_seqs=4, budget=16)
    seeded = dict(temperature=0.9, top_p=0.95, top_k=40, seed=11)
    rng = random.Random(6)
    prompt = random_prompt(rng, 12)

    async def run() -> tuple[list, list]:
        await eng.start()
        alone = await collect(eng, greq("alone", prompt, 24, **seeded))
        others = [collect(eng, greq(f"o{i}", random_prompt(rng, 5 + 9 * i), 30, temperature=1.0, min_p=0.05),
                          delay=0.003 * i) for i in range(3)]
        together, *_ = await asyncio.gather(collect(eng, greq("together", prompt, 24, **seeded), delay=0.005),
                                            *others)
        await eng.shutdown()
        return alone, together

    alone, together = asyncio.run(run())
    assert [e.token_id for e in together] == [e.token_id for e in alone]


def test_one_sample_call_per_step_for_exactly_the_rows_that_produce_a_token(monkeypatch) -> None:
    calls: list[int] = []
    real = engine_module.sample
    monkeypatch.setattr(engine_module, "sample", lambda logits, params, *a: calls.append(len(params)) or
                        real(logits, params, *a))
    eng, rec = make(max_seqs=3, budget=8)
    rng = random.Random(7)

    async def run() -> None:
        await eng.start()
        await asyncio.gather(*[collect(eng, greq(f"r{i}", random_prompt(rng, 30 - 6 * i), 10), delay=0.004 * i)
                               for i in range(5)])  # r0 alone first: 30 prompt tokens, 8 per step
        await eng.shutdown()

    asyncio.run(run())
    assert calls == [s.num_sampled for s in rec.steps if s.num_sampled]
    assert sum(calls) == 50 and any(s.num_sampled == 0 for s in rec.steps)  # mid-prompt steps sample nothing


def test_abort_frees_the_row_within_one_step() -> None:
    eng, rec = make(model="tiny-llama", max_seqs=1, budget=8)

    async def run() -> tuple[int, list, dict]:
        await eng.start()
        first = eng.generate(greq("first", [2, 40, 41, 42], 400))
        for _ in range(3):
            await anext(first)
        second = asyncio.ensure_future(collect(eng, greq("second", [2, 50, 51], 5)))
        await asyncio.sleep(0.05)
        assert eng.stats().scheduler.num_waiting == 1  # no free row while "first" runs
        made = eng.stats().num_generated_tokens  # "first" runs alone: one token per step, so also steps done
        eng.abort("first")
        await first.aclose()
        got = await second
        stats = eng.stats().scheduler
        await eng.shutdown()
        return made, got, stats

    made, got, stats = asyncio.run(run())
    first, second = rec.requests["first"], rec.requests["second"]
    # The step in flight when abort() was called may still run "first"; the next one runs "second".
    assert first.finish_reason == "abort" and first.num_output_tokens <= made + 1
    assert second.first_token_time <= rec.steps[made + 1].time
    assert len(got) == 5 and (stats.num_running, stats.kv_rows_used, stats.kv_slots_used) == (0, 0, 0)


def test_a_request_aborted_while_waiting_never_runs() -> None:
    eng, rec = make(model="tiny-llama", max_seqs=1, budget=8)

    async def run() -> list:
        await eng.start()
        first = eng.generate(greq("first", [2, 40, 41], 400))
        await anext(first)
        waiting = asyncio.ensure_future(collect(eng, greq("waiting", [2, 50], 5)))
        await asyncio.sleep(0.02)
        eng.abort("waiting")
        got = await waiting
        eng.abort("first")
        await first.aclose()
        await eng.shutdown()
        return got

    assert asyncio.run(run()) == []
    assert rec.requests["waiting"].num_output_tokens == 0 and rec.requests["waiting"].first_token_time is None


def test_observer_sees_every_step_and_every_request() -> None:
    eng, rec = make(max_seqs=4, budget=16)
    jobs = {"a": ([2, 9, 10, 11], 7), "b": (list(range(2, 40)), 3), "c": ([2, 30], 12)}

    async def run() -> None:
        await eng.start()
        await asyncio.gather(*[collect(eng, greq(rid, ids, n)) for rid, (ids, n) in jobs.items()])
        await eng.shutdown()

    asyncio.run(run())
    assert sum(s.num_sampled for s in rec.steps) == 22 == eng.stats().num_generated_tokens
    row = eng.core.runner.max_len  # a row's slots
    assert all(0 < s.model_s < s.step_s and s.kv_slots_total == 4 * row for s in rec.steps)
    for rid, (ids, n) in jobs.items():
        r = rec.requests[rid]
        assert (r.num_prompt_tokens, r.num_output_tokens, r.finish_reason) == (len(ids), n, "length")
        assert r.arrival_time <= r.first_token_time <= r.finish_time
    assert rec.steps[-1].num_running == rec.steps[-1].kv_slots_used == 0
    assert EngineCore(eng.core.scheduler, eng.core.runner).observers == ()  # by default nobody watches


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on() -> None:
    eng, rec = make(model="tiny-llama")

    async def run() -> list:
        await eng.start()
        runner = eng.core.runner
        real = runner.forward
        runner.forward = lambda inputs: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            await collect(eng, greq("bad", [2, 3, 4], 5))
        runner.forward = real
        got = await collect(eng, greq("good", [2, 3, 4], 5))
        await eng.shutdown()
        return got

    assert len(asyncio.run(run())) == 5
    assert rec.requests["bad"].finish_reason == "error" and rec.steps[-1].kv_slots_used == 0


def test_prompt_longer_than_a_cache_row_is_refused_and_the_engine_goes_on() -> None:
    eng, _ = make(model="tiny-llama", max_model_len=32)

    async def run() -> list:
        await eng.start()
        assert eng.info().max_model_len == 32
        with pytest.raises(ValueError, match="prompt_token_ids"):
            await collect(eng, greq("long", list(range(2, 42)), 5))
        got = await collect(eng, greq("short", [2, 3, 4], 5))
        await eng.shutdown()
        return got

    assert len(asyncio.run(run())) == 5


def test_the_served_context_is_what_a_cache_row_holds() -> None:
    per_token = 2 * 2 * 2 * 16 * 4  # tiny-llama: K and V, 2 layers, 2 KV heads, head_dim 16, float32
    eng, _ = make(model="tiny-llama", max_seqs=4, gib=4 * 100 * per_token / 2 ** 30)

    async def run() -> int:
        await eng.start()
        n = eng.info().max_model_len
        await eng.shutdown()
        return n

    assert asyncio.run(run()) == 100  # the model's own 512 cut to what 4 rows can hold
    eng, _ = make(model="tiny-llama", max_seqs=4, max_model_len=400, gib=4 * 100 * per_token / 2 ** 30)
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(eng.start())


def test_linear_backend_auto_is_onednn_on_cpu_float32_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_linear_backend("auto", cpu, torch.float32) == "onednn"
    assert resolve_linear_backend("auto", cpu, torch.bfloat16) == "torch"
    assert resolve_linear_backend("auto", cuda, torch.float32) == "torch"
    assert resolve_linear_backend("torch", cpu, torch.float32) == "torch"
    with pytest.raises(ValueError, match="linear_backend"):
        resolve_linear_backend("onednn", cuda, torch.float32)


def test_a_dead_engine_thread_fails_its_requests_and_refuses_new_ones_at_once() -> None:
    """An error outside the forward (here: the scheduler) kills the engine thread: the request in
    flight gets the error, ``error()`` says why, and a new request is a 503 at once, not a hang."""
    eng, _ = make(model="tiny-llama")

    async def run() -> None:
        await eng.start()
        first = eng.generate(greq("running", [2, 3, 4], 400))
        await anext(first)
        eng.core.scheduler.schedule = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RequestError, match="engine thread died: RuntimeError: boom") as e:
            async for _ in first:
                pass
        assert e.value.status == 503 and "boom" in eng.error()
        with pytest.raises(RequestError, match="cannot serve"):
            await asyncio.wait_for(collect(eng, greq("after", [2, 3], 2)), 5)
        await eng.shutdown()

    asyncio.run(run())


def test_after_shutdown_a_request_is_refused_at_once_not_left_waiting() -> None:
    eng, _ = make(model="tiny-llama")

    async def run() -> None:
        await eng.start()
        await eng.shutdown()
        with pytest.raises(RequestError, match="shutting down") as e:
            await asyncio.wait_for(collect(eng, greq("late", [2, 3], 2)), 5)
        assert e.value.status == 503

    asyncio.run(run())


def test_request_policies_admit_all_or_none() -> None:
    """A later policy's refusal undoes what the earlier ones admitted (nothing leaks)."""
    calls: list[str] = []

    class Policy:
        def __init__(self, name: str, refuse: bool) -> None:
            self.name, self.refuse = name, refuse

        def on_arrival(self, request: GenerationRequest) -> None:
            calls.append(f"{self.name}:arrival")
            if self.refuse:
                raise RequestError("no", status=429)

        def on_token(self, request: GenerationRequest) -> None:
            calls.append(f"{self.name}:token")

        def on_finish(self, request: GenerationRequest) -> None:
            calls.append(f"{self.name}:finish")

        def stats(self) -> None:
            return None

    eng = AsyncEngine(ModelConfig(model="tiny-llama"), build_core=lambda lm: None,  # type: ignore[arg-type,return-value]
                      request_policies=[Policy("a", False), Policy("b", True)])
    with pytest.raises(RequestError):
        asyncio.run(collect(eng, greq("r", [2, 3], 2)))
    assert calls == ["a:arrival", "b:arrival", "a:finish"]
