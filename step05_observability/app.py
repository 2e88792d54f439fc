"""``make_app``: the shared OpenAI API plus ``GET /metrics`` (Prometheus text format).

The X-Request-Id handling (a client's id used as the base of the engine request ids and echoed;
otherwise the generated one echoed) lives in ``shared/api.py``, so every step has it.
"""
from __future__ import annotations

import argparse

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.api import build_app
from step05_observability.engine import ObservedEngine


def add_metrics_route(app: FastAPI, engine: ObservedEngine) -> None:
    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(engine.registry), media_type=CONTENT_TYPE_LATEST)


def make_app(engine: ObservedEngine, ns: argparse.Namespace | None = None) -> FastAPI:
    app = build_app(engine)
    add_metrics_route(app, engine)
    return app
