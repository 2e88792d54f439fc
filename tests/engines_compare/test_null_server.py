"""The null server speaks enough OpenAI for the client, conformance probes and httpx alike."""
from __future__ import annotations

import asyncio
import json

import httpx

from engines_compare import null_server


def _with_server(cfg: null_server.NullConfig, fn) -> object:
    async def go() -> object:
        srv, port = await null_server.start(cfg)
        async with srv, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            return await fn(client)
    return asyncio.run(go())


def test_models_version_health_and_unknown_routes() -> None:
    async def fn(client: httpx.AsyncClient) -> list:
        return [await client.get(p) for p in ("/v1/models", "/version", "/health", "/nope")]
    models, version, health, nope = _with_server(null_server.NullConfig(model="m0"), fn)
    assert models.json()["data"][0]["id"] == "m0" and version.json() == {"version": "null-server"}
    assert health.status_code == 200 and nope.status_code == 404


def test_streamed_and_plain_completions_carry_max_tokens_tokens_and_usage() -> None:
    async def fn(client: httpx.AsyncClient) -> tuple:
        plain = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
        events = []
        async with client.stream("POST", "/v1/completions", json={
                "prompt": "abcd", "stream": True, "stream_options": {"include_usage": True}}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        return plain, events
    plain, events = _with_server(null_server.NullConfig(tokens=5), fn)
    body = plain.json()
    assert body["choices"][0]["text"] == " tok" * 3 and body["usage"]["completion_tokens"] == 3
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) == 5  # --tokens without max_tokens
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
