"""The app and the gate in-process, around an engine that holds every request until told: 429 and
/ready, limits (400, 413), draining (503, in-flight requests finish, the drain timeout cuts), and
the slow-reader bound. Deterministic: nothing depends on how fast a model runs."""
from __future__ import annotations

import argparse
import asyncio
from typing import Any, AsyncIterator

import httpx
import pytest

from shared.config import ModelConfig
from shared.engine import GenerationRequest, ModelInfo, TokenEvent
from shared.models import load_tokenizer
from step06_backpressure.admission import AdmissionConfig, AdmissionStats, Backlog
from step06_backpressure.app import LimitsConfig, make_app
from step06_backpressure.gate import GateConfig, Outbox, SlowReader


class HoldingEngine:
    """Holds each request until ``release`` is set, then gives ``max_tokens`` tokens; the backlog is
    its request policy, as in step 06's assembly (claimed on arrival, freed when the request ends)."""

    def __init__(self, admission: AdmissionConfig) -> None:
        self.backlog = Backlog(admission, max_running=1)
        self.release = asyncio.Event()
        self.aborted: list[str] = []
        self.failed: str | None = None  # what error() reports
        self._info = ModelInfo("holding", load_tokenizer(ModelConfig(model="tiny-llama")), 512, 256)

    async def start(self) -> None:
        pass

    def info(self) -> ModelInfo:
        return self._info

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.backlog.on_arrival(request)
        try:
            await self.release.wait()
            n = request.params.max_tokens
            for i in range(n):
                yield TokenEvent(70 + i % 20, finish_reason="length" if i == n - 1 else None)
        finally:
            self.backlog.on_finish(request)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def error(self) -> str | None:
        return self.failed

    def stats(self) -> AdmissionStats:
        return self.backlog.stats()

    async def shutdown(self) -> None:
        pass


def build(admission: AdmissionConfig = AdmissionConfig(), limits: LimitsConfig = LimitsConfig(),
          gate: GateConfig = GateConfig()) -> tuple[HoldingEngine, Any]:
    engine = HoldingEngine(admission)
    ns = {f"{cls.__name__}.{k}": v for cls, cfg in ((LimitsConfig, limits), (GateConfig, gate))
          for k, v in ((f, getattr(cfg, f)) for f in cfg.__dataclass_fields__)}
    return engine, make_app(engine, engine.backlog, ns=argparse.Namespace(**ns))


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


async def until(cond: Any) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def error(r: httpx.Response, status: int, code: str | None, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_a_full_backlog_answers_429_with_retry_after_and_ready_says_overloaded() -> None:
    engine, app = build(AdmissionConfig(max_waiting_requests=1, retry_after=3))  # 1 row + 1 waiting

    async def main() -> None:
        async with client(app) as c:
            first = asyncio.create_task(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "n": 2}))
            await until(lambda: engine.backlog.num_in_flight == 2)
            r = await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True})
            error(r, 429, "server_overloaded")
            assert r.headers["retry-after"] == "3"
            ready = await c.get("/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "overloaded"
            engine.release.set()
            assert (await first).json()["usage"]["completion_tokens"] == 6
            ready = await c.get("/ready")
            assert ready.status_code == 200 and ready.json()["num_in_flight"] == 0
            assert ready.json()["num_refused"] == 1 and ready.json()["gate"]["num_in_flight"] == 0

    asyncio.run(main())


def test_limits_on_prompt_max_tokens_timeout_and_body_size() -> None:
    engine, app = build(limits=LimitsConfig(max_prompt_tokens=30, max_output_tokens=8),
                        gate=GateConfig(max_body_bytes=300))
    engine.release.set()

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b'{"prompt": "' + b"a" * 40 + b'"}'

    async def main() -> None:
        async with client(app) as c:
            post = lambda body: c.post("/v1/completions", json=body)  # noqa: E731
            error(await post({"prompt": "a long prompt of many tokens, more than thirty of them"}), 400, None, "prompt")
            error(await post({"prompt": "Hi", "max_tokens": 9}), 400, None, "max_tokens")
            error(await post({"prompt": "Hi", "timeout": 0}), 400, None, "timeout")
            error(await post({"prompt": "Hi", "timeout": "soon"}), 400, None, "timeout")
            chat = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
            assert chat.json()["usage"]["completion_tokens"] == 8  # no max_tokens: the server's cap
            assert (await post({"prompt": "Hi"})).json()["usage"]["completion_tokens"] == 8  # not the default 16
            error(await post({"prompt": "Hi", "user": "x" * 400}), 413, "request_too_large")
            r = await c.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
            error(r, 413, "request_too_large")
            assert (await post({"prompt": "Hi", "max_tokens": 8})).status_code == 200

    asyncio.run(main())


async def start_one_then_drain(app, c) -> tuple[asyncio.Task, asyncio.Event]:
    """One request running in the engine, then SIGTERM's drain begun; ``done`` is set when it ends."""
    done = asyncio.Event()
    running = asyncio.create_task(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4}))
    await until(lambda: app.state.gate.in_flight == 1)
    app.state.gate.begin_drain(done.set)
    return running, done


def test_draining_turns_new_work_away_with_503_and_lets_running_requests_finish() -> None:
    engine, app = build()

    async def main() -> None:
        async with client(app) as c:
            running, done = await start_one_then_drain(app, c)
            error(await c.post("/v1/completions", json={"prompt": "Hi"}), 503, "shutting_down")
            ready = await c.get("/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            assert (await c.get("/health")).status_code == 200  # still alive
            await asyncio.sleep(0.1)
            assert not done.is_set()  # it waits for the running request
            engine.release.set()
            r = await running
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
            await asyncio.wait_for(done.wait(), 5)
            assert app.state.gate.stats().num_turned_away == 1

    asyncio.run(main())


def test_drain_timeout_cuts_what_is_still_running_and_aborts_it_in_the_engine() -> None:
    engine, app = build(gate=GateConfig(drain_timeout=0.2))

    async def main() -> None:
        async with client(app) as c:
            running, done = await start_one_then_drain(app, c)
            await asyncio.wait_for(done.wait(), 5)
            assert app.state.gate.in_flight == 0 and app.state.gate.stats().num_cut_at_drain_timeout == 1
            await until(lambda: len(engine.aborted) == 1)
            running.cancel()

    asyncio.run(main())


def test_outbox_aborts_only_a_client_that_stalls_beyond_the_bound() -> None:
    async def main() -> None:
        sent: list[Any] = []
        socket_free = asyncio.Event()

        async def send(message: Any) -> None:
            await socket_free.wait()
            sent.append(message)

        box = Outbox(send, limit=5)
        pump = asyncio.create_task(box.pump())
        chunk = {"type": "http.response.body", "body": b"x", "more_body": True}
        for _ in range(5):  # a burst before the pump ran: not a slow reader
            await box.put(chunk)
        await asyncio.sleep(0.01)  # the pump is now stuck in send(): the client does not read
        await box.put(chunk)
        with pytest.raises(SlowReader):
            await box.put(chunk)
        socket_free.set()
        box.close()
        await asyncio.wait_for(pump, 5)
        assert len(sent) == 6

    asyncio.run(main())


@pytest.mark.parametrize("body, param", [
    (b"[" * 100_000, None),  # nesting deep enough to blow the JSON parser's recursion limit
    (b'{"prompt": "\xff\xfe"}', None),  # not UTF-8
    (b"", None), (b"null", None), (b'"just a string"', None),
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "n": 100000}', "n"),
    (b'{"prompt": "x", "max_tokens": 99999999999999999999999}', "max_tokens"),
    (b'{"prompt": [[]]}', "prompt"),
    (b'{"prompt": "x", "timeout": true}', "timeout"),
])
def test_hostile_bodies_are_400s_naming_the_field_never_500s(body: bytes, param: str | None) -> None:
    engine, app = build()
    engine.release.set()

    async def main() -> httpx.Response:
        async with client(app) as c:
            return await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})

    r = asyncio.run(main())
    err = error(r, 400, None)
    if param is not None:
        assert err["param"] == param, err


def test_nul_bytes_and_control_characters_in_a_prompt_are_just_text() -> None:
    engine, app = build()
    engine.release.set()

    async def main() -> httpx.Response:
        async with client(app) as c:
            return await c.post("/v1/completions", json={"prompt": "a\u0000b\u001b[2J\r\n", "max_tokens": 2})

    assert asyncio.run(main()).json()["usage"]["completion_tokens"] == 2


def test_a_failed_engine_is_a_503_on_health_ready_and_requests_never_a_hang() -> None:
    engine, app = build()
    engine.failed = "engine thread died: RuntimeError: boom"

    async def main() -> None:
        async with client(app) as c:
            for path in ("/health", "/ready"):
                r = await c.get(path)
                assert r.status_code == 503 and r.json()["status"] == "failed", r.text
                assert r.json()["error"] == engine.failed
            err = error(await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}), 503, "engine_failed")
            assert "boom" in err["message"]
            assert engine.backlog.num_in_flight == 0  # refused before admission

    asyncio.run(main())
