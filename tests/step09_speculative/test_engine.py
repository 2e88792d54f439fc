"""Step 09's engine in-process on the tiny models: greedy output token for token transformers' (so
step 08's) with both proposers, under random arrivals, forced preemption and prefix hits; seeded
sampling identical to no speculation; penalties, logprobs and min_tokens unchanged; every KV block
back after aborts in the middle of speculation."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from shared.config import ModelConfig
from shared.engine import GenerationRequest, TokenEvent
from shared.sampling import SamplingParams
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import EngineCore
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from step07_paged_kv.model_runner import PagedCacheConfig, build_paged_runner
from step09_speculative.__main__ import spec_core
from step09_speculative.config import SpeculativeConfig
from tests.step07_paged_kv.test_engine import Steps, assert_exact, run_jobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
METHODS = ("ngram", "int4", "early-exit")  # the proposers: n-gram, and both drafts


def make(model: str, method: str, num_blocks: int = 64, k: int = 3, max_seqs: int = 4) -> tuple[AsyncEngine, Steps]:
    """Step 09's core over step 07's float32 runner; speculation at every batch size. ``method``:
    none, ngram, or a draft (int4, early-exit)."""
    sched = SchedulerConfig(max_seqs=max_seqs, max_num_batched_tokens=16)
    cache = PagedCacheConfig(block_size=4, num_kv_blocks=num_blocks)
    draft = method if method in ("int4", "early-exit") else "int4"
    spec = SpeculativeConfig(speculative_method="draft" if method == draft else method, num_speculative_tokens=k,
                             prompt_lookup_min=1, speculative_draft=draft, speculative_draft_layers=1,
                             speculative_max_verify_tokens=0)
    rec, build = Steps(), spec_core(spec)

    def build_core(lm) -> EngineCore:
        return build(lm, build_paged_runner(lm, RunnerConfig(1.0), cache, explicit_len=False), sched, cache, [rec], [])

    return AsyncEngine(ModelConfig(model=model), build_core), rec


def looping_jobs(rng: random.Random, n: int) -> list[tuple]:
    """Prompts that repeat a segment (n-gram proposals find matches) after a shared 18-token prefix."""
    prefix = [2, *(rng.randrange(6, 262) for _ in range(17))]
    jobs = []
    for i in range(n):
        seg = [rng.randrange(6, 262) for _ in range(rng.choice([2, 3, 5]))]
        jobs.append((f"r{i}", prefix + seg * rng.choice([1, 2, 3]), rng.randint(1, 40), rng.random() < 0.3,
                     rng.random() * 0.1))
    return jobs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_greedy_is_exact_under_preemption_with_drafts_accepted_and_rejected(model: str, method: str) -> None:
    jobs = looping_jobs(random.Random(f"spec-{model}-{method}"), 10)
    eng, rec = make(model, method, num_blocks=20)
    results, _, stats = run_jobs(eng, jobs)
    assert_exact(model, jobs, results)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    if (model, method) != ("tiny-llama", "ngram"):  # tiny-llama's random weights hardly ever repeat
        assert stats.spec_decode_num_accepted_tokens > 0  # some drafts were accepted ...
        assert any(s.num_sampled > s.num_decode_seqs + s.num_prefill_seqs for s in rec.steps)  # >1 token a row
    assert stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens  # ... and some rejected
    assert stats.kv_blocks_used == 0 and stats.num_running == 0  # every block came back


def generate_all(eng: AsyncEngine, reqs: list[GenerationRequest], stop_after: dict[str, int] | None = None) -> tuple:
    """Every request's token events (a request in ``stop_after`` is aborted after that many), and
    the scheduler's stats at the end."""
    async def one(r: GenerationRequest) -> list[TokenEvent]:
        events = []
        gen = eng.generate(r)
        async for item in gen:
            if isinstance(item, TokenEvent):
                events.append(item)
                if stop_after and len(events) >= stop_after.get(r.request_id, 10 ** 9):
                    eng.abort(r.request_id)
                    await gen.aclose()
                    break
        return events

    async def run() -> tuple:
        await eng.start()
        try:
            out = await asyncio.gather(*(one(r) for r in reqs))
            await asyncio.sleep(0.2)  # the engine thread retires the aborted ones
            return out, eng.stats().scheduler
        finally:
            await eng.shutdown()

    return asyncio.run(run())


def requests(params: list[SamplingParams], seed: str) -> list[GenerationRequest]:
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(params):
        seg = [rng.randrange(6, 262) for _ in range(3)]
        out.append(GenerationRequest(f"q{i}", tuple([2, *seg * 3]), p, time.monotonic()))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_seeded_sampling_equals_sampling_without_speculation(method: str) -> None:
    params = [SamplingParams(max_tokens=30, temperature=t, top_p=tp, seed=s, ignore_eos=True)
              for t, tp, s in [(0.8, 1.0, 1), (1.0, 0.9, 2), (0.5, 1.0, 3), (1.3, 0.95, 4)]]
    reqs = requests(params, "seeded")
    with_spec, stats = generate_all(make("tiny-gemma3", method)[0], reqs)
    without, _ = generate_all(make("tiny-gemma3", "none")[0], reqs)
    assert [[e.token_id for e in r] for r in with_spec] == [[e.token_id for e in r] for r in without]
    assert stats.spec_decode_num_accepted_tokens > 0


def test_unseeded_sampling_with_draft_probabilities_completes_every_request() -> None:
    params = [SamplingParams(max_tokens=25, temperature=0.9, ignore_eos=True) for _ in range(4)]
    out, stats = generate_all(make("tiny-gemma3", "int4")[0], requests(params, "unseeded"))
    assert [len(r) for r in out] == [25] * 4 and out[0][-1].finish_reason == "length"
    assert stats.spec_decode_num_draft_tokens > 0 and stats.kv_blocks_used == 0


@pytest.mark.parametrize("method", METHODS)
def test_penalties_logprobs_and_min_tokens_behave_as_without_speculation(method: str) -> None:
    base = dict(temperature=0.0, max_tokens=24, logprobs=3)
    params = [SamplingParams(**base, presence_penalty=1.5, ignore_eos=True),
              SamplingParams(**base, frequency_penalty=0.7, ignore_eos=True),
              SamplingParams(**base, min_tokens=20),  # EOS masked below 20 tokens, then allowed
              SamplingParams(**{**base, "max_tokens": 7}, ignore_eos=True)]
    reqs = requests(params, "penalties")
    with_spec, stats = generate_all(make("tiny-gemma3", method)[0], reqs)
    without, _ = generate_all(make("tiny-gemma3", "none")[0], reqs)
    for a, b in zip(with_spec, without):
        assert [e.token_id for e in a] == [e.token_id for e in b]
        assert [e.finish_reason for e in a] == [e.finish_reason for e in b]
        assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a, b))
        assert [[t for t, _ in x.top_logprobs] for x in a] == [[t for t, _ in y.top_logprobs] for y in b]
    assert len(with_spec[3]) == 7 and stats.spec_decode_num_draft_tokens > 0


@pytest.mark.parametrize("method", METHODS)
def test_aborts_in_the_middle_of_speculation_give_every_block_back(method: str) -> None:
    params = [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True) for _ in range(6)]
    reqs = requests(params, "aborts")
    out, stats = generate_all(make("tiny-gemma3", method, max_seqs=6)[0], reqs,
                              stop_after={r.request_id: 3 + 4 * i for i, r in enumerate(reqs[:4])})
    assert [len(r) for r in out[4:]] == [60, 60]
    assert stats.spec_decode_num_draft_tokens > 0
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def test_prompt_logprobs_of_a_prefill_chunked_beside_speculating_decodes() -> None:
    """A prompt asking for its logprobs is prefilled in chunks in steps where another sequence
    verifies drafts: its rows follow the decodes' 1 + k rows, and its logprobs are transformers'."""
    from shared.engine import RequestFacts
    from tests.helpers import prompt_ids
    from tests.test_prompt_logprobs import PROMPT, reference_prompt_logprobs

    ids = prompt_ids("tiny-gemma3", PROMPT * 2)
    eng, rec = make("tiny-gemma3", "ngram")

    async def run() -> list:
        await eng.start()
        try:
            busy = asyncio.ensure_future(_drain(eng.generate(requests(
                [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)], "busy")[0])))
            await asyncio.sleep(0.05)
            asking = GenerationRequest("lp", tuple(ids), SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1),
                                       time.monotonic())
            items = [i async for i in eng.generate(asking)]
            await busy
            return items
        finally:
            await eng.shutdown()

    items = asyncio.run(run())
    facts = next(i for i in items if isinstance(i, RequestFacts))
    got = [p.logprob for p in facts.prompt_logprobs[1:]]
    assert got == pytest.approx(reference_prompt_logprobs("tiny-gemma3", list(ids)), abs=1e-4)
    assert any(s.num_prefill_tokens and s.num_decode_seqs for s in rec.steps)  # chunks beside decodes


async def _drain(gen) -> list:
    return [i async for i in gen]
