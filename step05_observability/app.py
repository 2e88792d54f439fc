"""``make_app``: the shared OpenAI API plus ``GET /metrics`` (Prometheus text format).

The X-Request-Id handling (a client's id used as the base of the engine request ids and echoed;
otherwise the generated one echoed) lives in ``shared/api.py``, so every step has it.
"""
from __future__ import annotations

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shared.api import build_app
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_view import EngineView


def add_metrics_route(app: FastAPI, registry: CollectorRegistry) -> None:
    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def make_app(engine: AsyncEngine, registry: CollectorRegistry, view: EngineView | None = None) -> FastAPI:
    """``view``: step 04's engine view, served at ``/debug/engine``."""
    app = build_app(engine)
    add_metrics_route(app, registry)
    if view is not None:
        view.attach(app, engine)
    return app
