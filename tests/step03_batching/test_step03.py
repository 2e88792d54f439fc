"""Step 03: batching changes nobody's output, and each mode shapes its batches as documented."""
from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time

import httpx
import pytest

from shared.config import ModelConfig
from shared.engine import GenerationRequest
from shared.models import load_model
from shared.sampling import SamplingParams
from step03_batching import batch_runner
from step03_batching.engine import BatchConfig, BatchingEngine
from tests.engine_helpers import request
from tests.helpers import prompt_ids, reference_greedy, server_greedy

MODEL = "tiny-gemma3"


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_any_batch_composition_gives_batch1_tokens(servers, mode: str) -> None:
    url = servers("step03_batching", MODEL, "--batching", mode, "--max-batch", "4", "--max-wait-ms", "50").url
    rng = random.Random(f"arrivals-{mode}")
    jobs = [(prompt_ids(MODEL, f"{i}: " + "xyz " * rng.randint(0, 12)), rng.randint(3, 30)) for i in range(10)]

    def run(job: tuple[list[int], int]) -> list[int]:
        time.sleep(rng.random() * 0.1)  # seeded, mixed arrival times
        return server_greedy(url, job[0], job[1], stop_at_eos=False)[0]

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    for (ids, n), tokens in zip(jobs, got):
        assert tokens == reference_greedy(MODEL, ids, n, stop_at_eos=False)[0]


def test_seeded_sampling_in_a_batch_equals_sampling_alone(servers) -> None:
    url = servers("step03_batching", MODEL, "--max-batch", "4", "--max-wait-ms", "100").url
    body = {"prompt": "Seeded", "max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 11, "ignore_eos": True}
    alone = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    others = [{"prompt": f"other {i}", "max_tokens": 20, "temperature": 1.0, "ignore_eos": True} for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: httpx.post(url + "/v1/completions", json=b, timeout=60).json(),
                                [body, *others]))
    assert results[0]["choices"][0]["text"] == alone


def _batch_widths(shrink: bool) -> list[int]:
    lm = load_model(ModelConfig(model=MODEL))
    widths: list[int] = []
    forward = lm.model.forward
    lm.model.forward = lambda *a, **kw: widths.append(kw["input_ids"].shape[0]) or forward(*a, **kw)
    reqs = [request("long", max_tokens=12), request("short", max_tokens=3)]
    flags = [threading.Event(), threading.Event()]
    list(batch_runner.generate_batch(lm, reqs, flags, threading.Event(), shrink))
    return widths


def test_dynamic_drops_finished_rows_and_static_keeps_the_shape() -> None:
    assert set(_batch_widths(shrink=False)) == {2}
    dynamic = _batch_widths(shrink=True)
    assert dynamic[:3] == [2, 2, 2] and set(dynamic[3:]) == {1}


def test_requests_arriving_together_share_one_batch(monkeypatch) -> None:
    sizes: list[int] = []
    real = batch_runner.generate_batch

    def spy(lm, reqs, *rest):
        sizes.append(len(reqs))
        return real(lm, reqs, *rest)

    monkeypatch.setattr("step03_batching.engine.generate_batch", spy)

    async def run() -> None:
        eng = BatchingEngine(ModelConfig(model=MODEL), BatchConfig(max_batch=3, max_wait_ms=200))
        await eng.start()
        streams = [eng.generate(request(f"r{i}", max_tokens=4)) for i in range(5)]
        outs = await asyncio.gather(*[_drain(s) for s in streams])
        assert all(len(o) == 4 for o in outs)
        await eng.shutdown()

    asyncio.run(run())
    assert sizes == [3, 2]


async def _drain(stream) -> list[int]:
    return [e.token_id async for e in stream]


def test_a_cancelled_row_leaves_the_others_correct() -> None:
    lm = load_model(ModelConfig(model=MODEL))
    ids = [tuple(prompt_ids(MODEL, p)) for p in ("first prompt", "second, longer prompt here")]
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), 0.0)
            for i, p in enumerate(ids)]
    flags = [threading.Event(), threading.Event()]
    got: dict[int, list[int]] = {0: [], 1: []}
    for i, event in batch_runner.generate_batch(lm, reqs, flags, threading.Event(), shrink=True):
        got[i].append(event.token_id)
        if i == 0 and len(got[0]) == 5:
            flags[0].set()
    assert len(got[0]) == 5
    assert got[1] == reference_greedy(MODEL, list(ids[1]), 20, stop_at_eos=False)[0]


def test_rejects_bad_batch_config() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        BatchConfig(max_batch=0)
