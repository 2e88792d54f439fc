"""Step 01 loads once, reports 503 until then, and keeps answering while it generates."""
from __future__ import annotations

import asyncio
import json

import httpx

from shared.api import build_app
from shared.config import ModelConfig
from step01_loader import engine as step01
from tests.engine_helpers import request


def test_health_is_503_until_loaded_then_200() -> None:
    async def run() -> tuple[int, int, int]:
        eng = step01.LoaderEngine(ModelConfig(model="tiny-llama"))
        transport = httpx.ASGITransport(app=build_app(eng))  # no lifespan: we start the engine ourselves
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            before = (await client.get("/health")).status_code
            refused = (await client.post("/v1/completions", json={"prompt": "x"})).status_code
            await eng.start()
            return before, refused, (await client.get("/health")).status_code

    assert asyncio.run(run()) == (503, 503, 200)


def test_loads_once_for_many_requests(monkeypatch) -> None:
    loads = []
    real = step01.load_model
    monkeypatch.setattr(step01, "load_model", lambda cfg: loads.append(1) or real(cfg))

    async def run() -> None:
        eng = step01.LoaderEngine(ModelConfig(model="tiny-llama"))
        await eng.start()
        for i in range(3):
            [e async for e in eng.generate(request(f"r{i}", max_tokens=3))]

    asyncio.run(run())
    assert loads == [1]


def test_health_answers_while_a_request_generates(servers) -> None:
    url = servers("step01_loader", "tiny-gemma3").url
    body = {"prompt": "Hi", "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        health = client.get(url + "/health")
        assert health.status_code == 200
        assert health.json()["num_running"] == 1, "the generation should still be running"
        rest = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
