"""Step 00 loads the model inside every request, and still answers correctly."""
from __future__ import annotations

import asyncio

from shared.config import ModelConfig
from step00_baseline import engine as step00
from tests.engine_helpers import request


def test_loads_the_weights_once_per_request(monkeypatch) -> None:
    loads = []
    real = step00.load_model
    monkeypatch.setattr(step00, "load_model", lambda cfg: loads.append(cfg) or real(cfg))

    async def run() -> list[list[int]]:
        eng = step00.BaselineEngine(ModelConfig(model="tiny-llama"))
        await eng.start()
        assert not loads, "start-up must not load the weights in step 00"
        outs = []
        for i in range(3):
            outs.append([e.token_id async for e in eng.generate(request(f"r{i}", max_tokens=5))])
        return outs

    outs = asyncio.run(run())
    assert len(loads) == 3
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 5
