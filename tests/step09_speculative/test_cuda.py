"""Step 09 on a CUDA GPU (skipped without one): the same engine parts on the device (float32, the
exactness dtype; the int4 draft in bf16); speculation's output equals no speculation, greedy and seeded.

This module builds its core from the parts directly (not ``__main__``'s ``spec_core``, whose
module imports the HTTP server), so that it runs on a machine with torch and transformers only.
"""
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
from step07_paged_kv.block_manager import BlockManager
from step07_paged_kv.model_runner import PagedCacheConfig, build_paged_runner
from step09_speculative.config import SpeculativeConfig
from step09_speculative.draft import DraftModelProposer, int4_draft
from step09_speculative.model_runner import SpecModelRunner
from step09_speculative.ngram import NgramProposer
from step09_speculative.rejection import SpeculativeSampler
from step09_speculative.scheduler import SpecScheduler

pytestmark = pytest.mark.gpu


def engine(method: str) -> AsyncEngine:
    sched, cache = SchedulerConfig(max_seqs=4, max_num_batched_tokens=32), PagedCacheConfig(block_size=4, num_kv_blocks=256)
    spec = SpeculativeConfig(speculative_method=method, num_speculative_tokens=3, prompt_lookup_min=1,
                             speculative_max_verify_tokens=0)

    def build(lm) -> EngineCore:
        runner = build_paged_runner(lm, RunnerConfig(1.0), cache, explicit_len=False)
        proposer = None
        if method == "ngram":
            proposer = NgramProposer(1, 4)
        elif method == "draft":
            proposer = DraftModelProposer(int4_draft(lm), runner.cache, runner.device)
        return EngineCore(SpecScheduler(sched, runner.max_len, lm.eos_token_ids,
                                        BlockManager(256, 4), spec),
                          SpecModelRunner(runner, proposer, spec.k), sampler=SpeculativeSampler(lm.eos_token_ids))

    return AsyncEngine(ModelConfig(model="tiny-gemma3", device="cuda", dtype="float32"), build)


def outputs(method: str, params: list[SamplingParams]) -> tuple[list[list[int]], object]:
    rng = random.Random("cuda")
    reqs = [GenerationRequest(f"r{i}", tuple([2, *[rng.randrange(6, 262) for _ in range(3)] * 3]), p, time.monotonic())
            for i, p in enumerate(params)]
    eng = engine(method)

    async def run():
        await eng.start()
        try:
            async def one(r):
                return [e.token_id async for e in eng.generate(r) if isinstance(e, TokenEvent)]
            return await asyncio.gather(*(one(r) for r in reqs)), eng.stats().scheduler
        finally:
            await eng.shutdown()

    return asyncio.run(run())


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculation_on_cuda_equals_no_speculation_greedy_and_seeded(method: str) -> None:
    params = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True) for _ in range(3)]
    params += [SamplingParams(max_tokens=40, temperature=0.8, seed=s, ignore_eos=True) for s in (1, 2)]
    plain, _ = outputs("none", params)
    spec, stats = outputs(method, params)
    assert spec == plain
    assert stats.spec_decode_num_accepted_tokens > 0 and stats.kv_blocks_used == 0
