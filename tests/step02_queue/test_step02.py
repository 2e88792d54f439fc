"""Step 02: one worker, FIFO; correct under concurrency; dropped clients leave at once."""
from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx

from shared.config import ModelConfig
from step02_queue import engine as step02
from tests.engine_helpers import TokenCounter, request
from tests.helpers import prompt_ids, reference_greedy, server_greedy


def test_eight_simultaneous_requests_all_get_their_own_correct_output(servers) -> None:
    url = servers("step02_queue", "tiny-gemma3").url
    prompts = [prompt_ids("tiny-gemma3", f"request {i}: " + "abc" * i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda ids: server_greedy(url, ids, 24, stop_at_eos=False)[0], prompts))
    for ids, tokens in zip(prompts, got):
        assert tokens == reference_greedy("tiny-gemma3", ids, 24, stop_at_eos=False)[0]


def _engine(monkeypatch, delay: float) -> tuple[step02.QueueEngine, TokenCounter]:
    counter = TokenCounter(step02.generate_tokens, delay)
    monkeypatch.setattr(step02, "generate_tokens", counter)
    return step02.QueueEngine(ModelConfig(model="tiny-llama")), counter


def test_mid_generation_abort_stops_within_one_token(monkeypatch) -> None:
    eng, counter = _engine(monkeypatch, delay=0.002)

    async def run() -> tuple[int, int]:
        await eng.start()
        events = eng.generate(request("a"))
        for _ in range(5):
            await anext(events)
        with counter.lock:
            at_abort = counter.counts["a"]
            eng.abort("a")
        await events.aclose()
        await asyncio.sleep(0.3)  # let the thread notice
        await eng.shutdown()
        return at_abort, counter.counts["a"]

    at_abort, final = asyncio.run(run())
    assert final <= at_abort + 1 < 400


def test_client_leaving_while_waiting_is_dropped_and_never_runs(monkeypatch) -> None:
    eng, counter = _engine(monkeypatch, delay=0.002)

    async def run() -> None:
        await eng.start()
        first = eng.generate(request("first"))
        await anext(first)  # "first" is running
        second = eng.generate(request("second"))
        task = asyncio.ensure_future(anext(second))
        await asyncio.sleep(0.05)
        assert [e.request.request_id for e in eng.waiting] == ["second"]
        task.cancel()  # the client goes away while waiting
        await asyncio.gather(task, return_exceptions=True)
        await second.aclose()
        assert not eng.waiting
        third = [e async for e in eng.generate(request("third", max_tokens=3))]  # after "first" ends
        assert len(third) == 3
        await first.aclose()
        await eng.shutdown()

    asyncio.run(run())
    assert "second" not in counter.started and counter.started[-1] == "third"


def test_dropped_http_stream_frees_the_worker(servers) -> None:
    url = servers("step02_queue", "tiny-gemma3").url
    body = {"prompt": "Hi", "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client:
        before = client.get(url + "/health").json()["num_generated_tokens"]
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
        deadline = time.monotonic() + 30
        while client.get(url + "/health").json()["num_running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = client.get(url + "/health").json()
        assert (health["num_running"], health["num_waiting"]) == (0, 0)
        assert health["num_generated_tokens"] - before < 480, "the dropped stream ran to the end"
        r = client.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
