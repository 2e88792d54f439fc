"""The playground's engine view: what the engine is doing, sampled for a page (``GET /debug/engine``).

Central rule: watching costs the engine nothing. The engine thread only keeps a reference to its
last step's stats (:class:`EngineView` is an observer whose ``on_step`` is one assignment); every
snapshot is read on the event loop, from the scheduler's queues and the parts' stats, at most
:data:`MAX_HZ` times a second and only while a page is connected. The stream is pulled, never
queued: the next snapshot is taken only once the last one was sent, a page that took more than
:data:`DROP_AFTER_S` to take one is dropped (the page reconnects), and at most
:data:`MAX_WATCHERS` pages watch at once (more get a 429).

A snapshot reads structures the engine thread changes meanwhile; copies are taken first
(``list(...)``, atomic under the GIL), and a snapshot that still meets a change mid-read is
skipped and taken again at the next tick: the view may lag a step, never crash the server.
Later steps add sections (``extras``): step 07 the KV block pool.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import EngineCore
from step04_kvcache.observer import RequestStats, StepStats

MAX_HZ = 10
MAX_WATCHERS = 4
DROP_AFTER_S = 2.0  # a page that took this long to take one snapshot is dropped (it reconnects)
Extra = Callable[[EngineCore], dict[str, Any]]


def sequences(queue: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"id": s.request_id, "prompt_tokens": s.num_prompt_tokens, "computed_tokens": s.num_computed_tokens,
             "output_tokens": s.num_output_tokens, "prefilling": s.is_prefilling, "blocks": list(s.block_table)}
            for s in list(queue)]


class EngineView:
    """An observer (the last step's stats) and the ``/debug/engine`` stream built on them."""

    def __init__(self, extras: Sequence[Extra] = ()) -> None:
        self.extras = tuple(extras)
        self.last: StepStats | None = None  # written by the engine thread, read by the event loop
        self.num_steps = 0
        self.watchers = 0

    def on_step(self, stats: StepStats) -> None:
        self.last, self.num_steps = stats, self.num_steps + 1

    def on_request_finished(self, stats: RequestStats) -> None:
        pass

    def snapshot(self, engine: AsyncEngine) -> dict[str, Any]:
        core, last = engine.core, self.last
        if core is None:
            return {"status": engine.error() and "failed" or "loading"}
        sched = core.scheduler
        body: dict[str, Any] = {
            "status": "failed" if engine.error() else "ok", "step": self.num_steps,
            "running": sequences(sched.running), "waiting": sequences(sched.waiting),
            "scheduler": dataclasses.asdict(sched.stats()),
            "last_step": None if last is None else {
                "time": last.time, "step_ms": round(last.step_s * 1e3, 2), "model_ms": round(last.model_s * 1e3, 2),
                "decodes": last.num_decode_seqs, "prefill_tokens": last.num_prefill_tokens,
                "sampled": last.num_sampled, "tokens": dict(last.scheduled)}}
        for extra in self.extras:
            body.update(extra(core))
        return body

    async def stream(self, engine: AsyncEngine) -> AsyncIterator[bytes]:
        self.watchers += 1
        try:
            while True:
                try:
                    body = json.dumps(self.snapshot(engine), separators=(",", ":"))
                except (RuntimeError, IndexError, KeyError):  # the engine changed a structure mid-read
                    body = None
                if body is not None:
                    t0 = time.monotonic()
                    yield f"data: {body}\n\n".encode()  # resumes once the page has taken it
                    if time.monotonic() - t0 > DROP_AFTER_S:
                        return  # a slow page: dropped, never buffered for
                await asyncio.sleep(1 / MAX_HZ)
        finally:
            self.watchers -= 1

    def attach(self, app: FastAPI, engine: AsyncEngine) -> None:
        """``GET /debug/engine``: server-sent events, one snapshot each, up to ``MAX_HZ`` a second."""

        @app.get("/debug/engine", include_in_schema=False)
        async def debug_engine() -> Any:
            if self.watchers >= MAX_WATCHERS:
                return JSONResponse({"error": {"message": f"at most {MAX_WATCHERS} pages watch the engine at once",
                                               "type": "rate_limit_error", "param": None, "code": None}},
                                    status_code=429)
            return StreamingResponse(self.stream(engine), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
