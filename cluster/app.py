"""The router's HTTP app: the OpenAI API, ``/health``, ``/metrics``, and the model manager's admin API.

Central rule: ``/health`` is 200 only when every replica the cluster should have is ready (like a
step's: a load balancer or a test waits on it); the admin API exists only when a bearer token was
given at start, and every admin call must carry it.

Admin API (Ray only): ``POST /admin/models`` ``{"model", "step", "replicas", "id"?, "threads"?,
"cpus"?, "tier"?, "args"?}`` → 202 and the model's progress; ``GET /admin/models/{id}`` → progress
(``loading`` / ``ready`` / ``failed``, per replica); ``DELETE /admin/models/{id}`` → unloaded.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from cluster.manager import AdminError, ModelManager, parse_spec
from cluster.replica import error
from cluster.router import Router

log = logging.getLogger("stepserve.cluster")


def metrics_text(router: Router) -> str:
    """Prometheus text: requests routed per replica, cache results, admission refusals."""
    lines = ["# TYPE stepserve:router_requests_total counter"]
    for r in router.replicas.values():
        lines.append(f'stepserve:router_requests_total{{replica="{r.name}",model="{r.model}"}} {r.num_routed}')
    lines += ["# TYPE stepserve:router_replica_healthy gauge"]
    lines += [f'stepserve:router_replica_healthy{{replica="{r.name}"}} {int(r.healthy)}' for r in router.replicas.values()]
    lines += ["# TYPE stepserve:router_refused_total counter",
              f"stepserve:router_refused_total {router.admission.num_refused}",
              "# TYPE stepserve:router_in_flight gauge", f"stepserve:router_in_flight {router.admission.in_flight}"]
    if router.cache is not None:
        lines.append("# TYPE stepserve:response_cache_total counter")
        for result, n in vars(router.cache.stats).items():
            lines.append(f'stepserve:response_cache_total{{result="{result}"}} {n}')
    return "\n".join(lines) + "\n"


def make_router_app(router: Router, manager: ModelManager | None = None, admin_token: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.refresh()
        poller = asyncio.create_task(router.poll())
        yield
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await router.client.aclose()
        if router.cache is not None:
            await router.cache.close()

    app = FastAPI(title="stepserve cluster router", lifespan=lifespan)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # an OpenAI-shaped 500, logged
        log.exception("unexpected error on %s", request.url.path, exc_info=exc)
        return error(500, f"internal error ({type(exc).__name__}); retry", "internal_error")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.forward(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await router.forward(request, chat=True)

    @app.get("/v1/models")
    async def models() -> Response:
        cards = [pool[0].card for pool in router.models().values() if pool[0].card is not None]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/health")
    async def health() -> JSONResponse:
        expected = getattr(router.discovery, "expected", lambda: 0)()
        healthy = sum(r.healthy for r in router.replicas.values())
        ready = healthy >= max(1, expected) and healthy == len(router.replicas)
        return JSONResponse({"status": "ok" if ready else "loading", "replicas_expected": expected,
                             "replicas_ready": healthy, **router.stats()}, 200 if ready else 503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness for a load balancer in front of several routers: every model has a healthy
        replica (``/health`` asks more: all of them)."""
        pools = router.models()
        ok = bool(pools) and all(any(r.healthy for r in pool) for pool in pools.values())
        return JSONResponse({"status": "ready" if ok else "unavailable",
                             "models": {m: sum(r.healthy for r in pool) for m, pool in pools.items()}},
                            200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics_text(router), media_type="text/plain; version=0.0.4")

    if manager is not None and admin_token:
        add_admin_routes(app, router, manager, admin_token)
    return app


def add_admin_routes(app: FastAPI, router: Router, manager: ModelManager, token: str) -> None:
    def authorised(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    async def admin(request: Request, work: Any) -> JSONResponse:
        if not authorised(request):
            return error(401, "admin endpoints need `Authorization: Bearer <token>` (the --admin-token)", "unauthorized")
        try:
            return await work()
        except AdminError as e:
            kind = "conflict" if e.status == 409 else "not_found" if e.status == 404 else "invalid_request"
            return error(e.status, str(e), kind, param=e.param)

    def healthy() -> set[str]:
        return {r.name for r in router.replicas.values() if r.healthy}

    @app.post("/admin/models")
    async def load(request: Request) -> JSONResponse:
        async def work() -> JSONResponse:
            try:
                body = json.loads(await request.body())
            except ValueError:
                raise AdminError(400, "the body must be JSON") from None
            spec = parse_spec(body)
            await asyncio.to_thread(manager.load, spec)
            return JSONResponse(await asyncio.to_thread(manager.status, spec.id, healthy()), 202)
        return await admin(request, work)

    @app.get("/admin/models/{model_id}")
    async def progress(model_id: str, request: Request) -> JSONResponse:
        async def work() -> JSONResponse:
            return JSONResponse(await asyncio.to_thread(manager.status, model_id, healthy()))
        return await admin(request, work)

    @app.delete("/admin/models/{model_id}")
    async def unload(model_id: str, request: Request) -> JSONResponse:
        async def work() -> JSONResponse:
            apps = await asyncio.to_thread(manager.unload, model_id)
            with contextlib.suppress(httpx.HTTPError):
                await router.refresh()  # forget its replicas now, not at the next poll
            return JSONResponse({"id": model_id, "deleted": True, "applications": apps})
        return await admin(request, work)
