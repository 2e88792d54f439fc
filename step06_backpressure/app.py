"""``make_app``: step 05's app, with limits and admission in the API and the gate in front of it.

``BackpressureServer`` (a subclass of the shared ``OpenAIServer``) adds, after the shared checks and
before the response starts (so that each refusal is a proper HTTP status, also for streams):

1. limits: a prompt longer than ``--max-prompt-tokens`` or a ``max_tokens`` above
   ``--max-output-tokens`` is a 400 naming the field; a request that gives no ``max_tokens``
   gets at most ``--max-output-tokens`` (not a 400 for the API's default);
2. the deadline: a request's ``timeout`` field must be > 0 (the shared API puts it on the engine
   request; the engine's ``Deadlines`` policy reads it there, or applies ``--request-timeout``);
3. admission: all the request's choices enter the backlog together, or it is a 429.

``GET /ready`` is the readiness probe: 200 ``ready`` while new work would be admitted, 503 with
``loading``, ``failed`` (the engine failed to load or died, with the error), ``overloaded`` (the
backlog is full) or ``draining`` (shutting down), and the engine's and the gate's counters. ``/health`` stays the liveness probe.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry

from shared import protocol as P
from shared.api import OpenAIServer, build_app
from shared.config import flag_field, from_args
from shared.engine import Engine, GenerationRequest
from shared.errors import RequestError
from step04_kvcache.engine_view import EngineView
from step05_observability.app import add_metrics_route
from step06_backpressure.admission import Backlog
from step06_backpressure.deadlines import Deadlines
from step06_backpressure.gate import Gate, GateConfig, GateMiddleware
from step06_backpressure.metrics import BackpressureCollector


@dataclasses.dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_prompt_tokens: int = flag_field(0, "longest prompt in tokens; beyond: 400 (0: the context length)")
    max_output_tokens: int = flag_field(0, "largest max_tokens; beyond: 400, and the default of requests "
                                        "that give none (0: what the context leaves)")

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 0 or self.max_output_tokens < 0:
            raise ValueError(f"max_prompt_tokens and max_output_tokens must be >= 0: {self}")


class BackpressureServer(OpenAIServer):
    def __init__(self, engine: Engine, backlog: Backlog, limits: LimitsConfig = LimitsConfig()) -> None:
        super().__init__(engine)
        self.backlog, self.limits = backlog, limits

    def default_max_tokens(self, room: int) -> int:
        cap = self.limits.max_output_tokens
        return min(room, cap) if cap else room

    def _choices(self, base_id: str, prompts: list[tuple[int, ...]], max_tokens: int | None,
                 req: P._Common, logprobs: int | None, prompt_param: str, prompt_logprobs: int | None = None,
                 echoes: list[str] | None = None) -> list[Any]:
        lim = self.limits
        for ids in prompts:
            if lim.max_prompt_tokens and len(ids) > lim.max_prompt_tokens:
                raise RequestError(f"{prompt_param}: {len(ids)} tokens; this server accepts prompts of at most "
                                   f"{lim.max_prompt_tokens} tokens", param=prompt_param)
        asked = req.model_fields_set & {"max_tokens", "max_completion_tokens"}  # not the API's default
        if lim.max_output_tokens and max_tokens is not None and max_tokens > lim.max_output_tokens:
            if asked:
                raise RequestError(f"max_tokens must be <= {lim.max_output_tokens} on this server, got "
                                   f"{max_tokens}", param="max_tokens")
            max_tokens = lim.max_output_tokens  # the API's default (16 for completions), capped
        if req.timeout is not None and not req.timeout > 0:
            raise RequestError(f"timeout must be > 0 seconds, got {req.timeout}", param="timeout")
        choices = super()._choices(base_id, prompts, max_tokens, req, logprobs, prompt_param, prompt_logprobs, echoes)
        self.backlog.admit([c.req for c in choices])  # the 429, if any, is raised here
        return choices

    async def _respond(self, request: Request, builder: Any, choices: list[Any], prompt_tokens: int, stream: bool,
                       include_usage: bool) -> Any:
        """Any choice the engine never started leaves the backlog when the response ends."""
        reqs = [c.req for c in choices]
        try:
            response = await super()._respond(request, builder, choices, prompt_tokens, stream, include_usage)
        except BaseException:
            self.backlog.release_unclaimed(reqs)
            raise
        if isinstance(response, StreamingResponse):  # release when the stream ends
            response.body_iterator = self._release_after(response.body_iterator, reqs)
        else:
            self.backlog.release_unclaimed(reqs)
        return response

    async def _release_after(self, body: Any, reqs: list[GenerationRequest]) -> Any:
        try:
            async for chunk in body:
                yield chunk
        finally:
            self.backlog.release_unclaimed(reqs)


def readiness(server: OpenAIServer, backlog: Backlog, gate: Gate) -> dict[str, Any]:
    """``/health``'s body with the readiness status: failed, draining, loading, overloaded or ready."""
    body = server.health()
    if body["status"] == "failed":
        return body
    if gate.draining:
        status = "draining"
    elif body["status"] == "loading":
        status = "loading"
    else:
        status = "overloaded" if backlog.overloaded() else "ready"
    return {**body, "status": status, "gate": dataclasses.asdict(gate.stats())}


def make_app(engine: Engine, backlog: Backlog, deadlines: Deadlines | None = None, ns: argparse.Namespace | None = None,
             registry: CollectorRegistry | None = None, view: EngineView | None = None) -> FastAPI:
    """Step 05's app (``/metrics`` when a ``registry`` is given, with step 06's series) with
    ``BackpressureServer``, ``/ready`` and the gate in front (``app.state.gate``). ``ns``: the
    limits' and the gate's flags (their defaults without)."""
    limits = from_args(LimitsConfig, ns) if ns is not None else LimitsConfig()
    gate_cfg = from_args(GateConfig, ns) if ns is not None else GateConfig()
    server = BackpressureServer(engine, backlog, limits)
    app = build_app(engine, server=server)
    gate = app.state.gate = Gate(gate_cfg, backlog.config.retry_after)
    app.add_middleware(GateMiddleware, gate=gate)
    if registry is not None:
        add_metrics_route(app, registry)
        registry.register(BackpressureCollector(backlog, deadlines, gate))
    if view is not None:  # step 04's engine view at /debug/engine
        view.attach(app, engine)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body = readiness(server, backlog, gate)
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    return app
