"""``make_app``: step 05's app, with limits and admission in the API and the gate in front of it.

``BackpressureServer`` (a subclass of the shared ``OpenAIServer``) adds, after the shared checks and
before the response starts (so that each refusal is a proper HTTP status, also for streams):

1. limits: a prompt longer than ``--max-prompt-tokens`` or a ``max_tokens`` above
   ``--max-output-tokens`` is a 400 naming the field; a request that gives no ``max_tokens``
   gets at most ``--max-output-tokens`` (not a 400 for the API's default);
2. the deadline: the request's ``timeout`` field (seconds; checked > 0) rides on the engine
   request (``TimedRequest``), else the engine applies ``--request-timeout``;
3. admission: all the request's choices enter the engine's backlog together, or it is a 429.

``GET /ready`` is the readiness probe: 200 ``ready`` while new work would be admitted, 503 with
``loading``, ``overloaded`` (the backlog is full) or ``draining`` (shutting down), and the
backlog's and the gate's counters either way. ``/health`` stays the liveness probe.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from shared import protocol as P
from shared.api import OpenAIServer, build_app
from shared.config import flag_field, from_args
from shared.errors import RequestError
from step05_observability.app import add_metrics_route
from step06_backpressure.engine import BackpressureEngine, TimedRequest
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
    def __init__(self, engine: BackpressureEngine, limits: LimitsConfig = LimitsConfig()) -> None:
        super().__init__(engine)
        self.limits = limits

    def _choices(self, base_id: str, prompts: list[tuple[int, ...]], max_tokens: int | None,
                 req: P._Common, logprobs: int | None, prompt_param: str) -> list[Any]:
        lim = self.limits
        for ids in prompts:
            if lim.max_prompt_tokens and len(ids) > lim.max_prompt_tokens:
                raise RequestError(f"{prompt_param}: {len(ids)} tokens; this server accepts prompts of at most "
                                   f"{lim.max_prompt_tokens} tokens", param=prompt_param)
        asked = req.model_fields_set & {"max_tokens", "max_completion_tokens"}  # not the API's default
        if lim.max_output_tokens and asked and max_tokens is not None and max_tokens > lim.max_output_tokens:
            raise RequestError(f"max_tokens must be <= {lim.max_output_tokens} on this server, got {max_tokens}",
                               param="max_tokens")
        if req.timeout is not None and not req.timeout > 0:
            raise RequestError(f"timeout must be > 0 seconds, got {req.timeout}", param="timeout")
        choices = super()._choices(base_id, prompts, max_tokens, req, logprobs, prompt_param)
        for c in choices:
            params = c.req.params
            if lim.max_output_tokens and params.max_tokens > lim.max_output_tokens:  # a default, not asked
                params = dataclasses.replace(params, max_tokens=lim.max_output_tokens)
            c.req = TimedRequest(c.req.request_id, c.req.prompt_token_ids, params, c.req.arrival_time, req.timeout)
        self.engine.backlog.admit([c.req for c in choices])  # the 429, if any, is raised here
        return choices

    async def _respond(self, request: Request, builder: Any, choices: list[Any], *args: Any) -> Any:
        """Any choice the engine never started leaves the backlog when the response ends."""
        reqs = [c.req for c in choices]
        try:
            response = await super()._respond(request, builder, choices, *args)
        except BaseException:
            self.engine.backlog.release_unclaimed(reqs)
            raise
        if isinstance(response, StreamingResponse):  # release when the stream ends
            response.body_iterator = self._release_after(response.body_iterator, reqs)
        else:
            self.engine.backlog.release_unclaimed(reqs)
        return response

    async def _release_after(self, body: Any, reqs: list[TimedRequest]) -> Any:
        try:
            async for chunk in body:
                yield chunk
        finally:
            self.engine.backlog.release_unclaimed(reqs)


def readiness(engine: BackpressureEngine, gate: Gate) -> dict[str, Any]:
    if gate.draining:
        status = "draining"
    elif engine.info() is None:
        status = "loading"
    else:
        status = "overloaded" if engine.backlog.overloaded() else "ready"
    return {"status": status, **engine.stats(), "in_flight": gate.in_flight, **gate.counts}


def make_app(engine: BackpressureEngine, ns: argparse.Namespace | None = None) -> FastAPI:
    """Step 05's app (``/metrics``) with ``BackpressureServer``, ``/ready``, step 06's metrics, and
    the gate in front (``app.state.gate``)."""
    limits = from_args(LimitsConfig, ns) if ns is not None else LimitsConfig()
    gate_cfg = from_args(GateConfig, ns) if ns is not None else GateConfig()
    app = build_app(engine, server=BackpressureServer(engine, limits))
    gate = app.state.gate = Gate(gate_cfg, engine.admission.retry_after)
    app.add_middleware(GateMiddleware, gate=gate)
    registry = getattr(engine, "registry", None)  # step 05's; absent on a bare engine (tests)
    if registry is not None:
        add_metrics_route(app, engine)
        registry.register(BackpressureCollector(engine, gate))

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body = readiness(engine, gate)
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    return app
