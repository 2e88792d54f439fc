"""Step 07's engine in-process: token-exact against transformers (and so against step 04) with a
roomy pool, under forced preemption, and with prefix-cache hits; blocks all come back."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from shared.config import ModelConfig
from shared.engine import GenerationRequest
from shared.sampling import SamplingParams
from shared.engine import RequestFacts, TokenEvent
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import EngineCore
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.observer import StepStats
from step04_kvcache.scheduler import SchedulerConfig
from step07_paged_kv.block_manager import BlockManager
from step07_paged_kv.model_runner import PagedCacheConfig, build_paged_runner
from step07_paged_kv.scheduler import PagedScheduler, PagedSchedulerStats
from tests.helpers import reference_greedy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Steps:
    def __init__(self) -> None:
        self.steps: list[StepStats] = []

    def on_step(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def on_request_finished(self, stats: object) -> None:
        pass


def make(model: str, num_blocks: int, block_size: int = 4, max_seqs: int = 4, budget: int = 16,
         prefix_caching: bool = True) -> tuple[AsyncEngine, Steps]:
    """Step 07's engine parts (paged runner and scheduler) with a recording observer; no step 06
    admission: the pool is the limit here."""
    sched = SchedulerConfig(max_seqs=max_seqs, max_num_batched_tokens=budget)
    cache = PagedCacheConfig(block_size=block_size, num_kv_blocks=num_blocks, enable_prefix_caching=prefix_caching)
    rec = Steps()

    def build_core(lm) -> EngineCore:
        runner = build_paged_runner(lm, RunnerConfig(1.0), cache, explicit_len=False)
        blocks = BlockManager(runner.cache.num_blocks, runner.cache.block_size, cache.enable_prefix_caching)
        return EngineCore(PagedScheduler(sched, runner.max_len, lm.eos_token_ids, blocks), runner, observers=[rec])

    return AsyncEngine(ModelConfig(model=model), build_core), rec


def greq(rid: str, ids: list[int], max_tokens: int, eos: bool = False) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=not eos)
    return GenerationRequest(rid, tuple(ids), params, time.monotonic())


def run_jobs(eng: AsyncEngine, jobs: list[tuple]) -> tuple[list[list], list[int], PagedSchedulerStats]:
    """Each job's token events, the cached prompt tokens each was told of (once, before its first
    token), and the scheduler's stats at the end."""
    async def one(rid: str, ids: list[int], n: int, eos: bool, delay: float) -> tuple[list, int]:
        await asyncio.sleep(delay)
        items = [e async for e in eng.generate(greq(rid, ids, n, eos))]
        facts = [i for i in items if isinstance(i, RequestFacts)]
        assert len(facts) == 1 and items[0] is facts[0], "the facts come once, first"
        return [i for i in items if isinstance(i, TokenEvent)], facts[0].num_cached_tokens

    async def run() -> tuple[list[list], list[int], PagedSchedulerStats]:
        await eng.start()
        try:
            results = await asyncio.gather(*[one(*job) for job in jobs])
            return [r[0] for r in results], [r[1] for r in results], eng.stats().scheduler
        finally:
            await eng.shutdown()

    return asyncio.run(run())


def random_jobs(rng: random.Random, n: int, prefix: list[int]) -> list[tuple]:
    return [(f"r{i}", prefix + [rng.randrange(6, 262) for _ in range(rng.choice([1, 6, 13, 22]))],
             rng.randint(1, 40), rng.random() < 0.3, rng.random() * 0.1) for i in range(n)]


def assert_exact(model: str, jobs: list[tuple], results: list[list]) -> None:
    for (rid, ids, n, eos, _), events in zip(jobs, results):
        ref = reference_greedy(model, ids, n, stop_at_eos=eos)[0]
        assert [e.token_id for e in events] == ref, f"{model} {rid}: prompt {len(ids)}, max_tokens {n}"
        assert events[-1].finish_reason == ("stop" if len(ref) < n else "length")


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_exact_under_forced_preemption_and_prefix_hits(model: str) -> None:
    """A pool of 20 blocks of 4 for 10 requests (a shared 18-token prefix, outputs up to 40 tokens,
    past the sliding window of 16): sequences are preempted and recomputed, prefixes are hit, and
    every request still equals its batch-1 transformers reference token for token."""
    rng = random.Random(f"preempt-{model}")
    prefix = [2, *(rng.randrange(6, 262) for _ in range(17))]
    jobs = random_jobs(rng, 10, prefix)
    eng, rec = make(model, num_blocks=20)
    results, hits, stats = run_jobs(eng, jobs)
    assert_exact(model, jobs, results)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert all(h in (0, 16) for h in hits) and 16 in hits  # whole blocks of the 18-token prefix
    assert sum(hits) == stats.prefix_cache_hits
    assert stats.kv_blocks_used == 0 and stats.num_running == 0  # every block came back
    assert max(s.kv_slots_used for s in rec.steps) <= 20 * 4 and {s.kv_slots_total for s in rec.steps} == {20 * 4}


def test_prefix_caching_off_computes_every_prompt_token_and_stays_exact() -> None:
    model = "tiny-gemma3"
    rng = random.Random("off")
    prefix = [2, *(rng.randrange(6, 262) for _ in range(20))]
    jobs = random_jobs(rng, 5, prefix)
    eng, rec = make(model, num_blocks=64, prefix_caching=False)
    results, hits, stats = run_jobs(eng, jobs)
    assert_exact(model, jobs, results)
    assert stats.prefix_cache_hits == 0 and stats.num_preemptions == 0
    assert set(hits) == {0}
    assert sum(s.num_prefill_tokens for s in rec.steps) == sum(len(j[1]) for j in jobs)


def test_a_cached_prefix_is_skipped_in_prefill() -> None:
    """The second request with the same 33-token prompt prefills only its last block's token:
    the first 32 come from the cache (and are reported), and its tokens are identical."""
    model = "tiny-llama"
    rng = random.Random("skip")
    prompt = [2, *(rng.randrange(6, 262) for _ in range(32))]
    jobs = [("first", prompt, 8, False, 0.0), ("second", prompt, 8, False, 0.5)]
    eng, rec = make(model, num_blocks=32, block_size=8)
    results, hits, stats = run_jobs(eng, jobs)
    assert [e.token_id for e in results[0]] == [e.token_id for e in results[1]]
    assert_exact(model, jobs[:1], results[:1])
    assert hits == [0, 32]
    assert sum(s.num_prefill_tokens for s in rec.steps) == 33 + 1
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (66, 32)


def test_a_sequence_that_needs_the_whole_pool_runs_alone_and_exactly() -> None:
    """Two requests that each need every block: the newer waits or is preempted, neither fails."""
    model = "tiny-llama"
    rng = random.Random("whole")
    jobs = [(f"r{i}", [2, *(rng.randrange(6, 262) for _ in range(9))], 22, False, 0.0) for i in range(2)]
    eng, _ = make(model, num_blocks=8)  # 32 tokens: one sequence of 10 + 22 at most
    results, _, stats = run_jobs(eng, jobs)
    assert_exact(model, jobs, results)
    assert stats.num_preemptions > 0 and stats.kv_blocks_used == 0
