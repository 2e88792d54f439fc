"""The router: the OpenAI API in front of several replicas, one policy choosing where each goes.

Central rule: the router reads a request only as far as its policy needs (the prompt's leading
token ids, ``max_tokens``, headers), then forwards the body unchanged and streams the replica's
answer back unchanged (status, ``Content-Type``, ``Retry-After``, ``X-Request-Id``, every SSE byte).
A client that leaves closes the upstream stream, so the replica aborts the request. A replica that
cannot be reached is a retriable 503 with ``Retry-After``, never a hang; the global admission bound
answers 429 before any replica queues.

Load comes from two places: the router's own count of outstanding requests per replica (exact,
immediate) and each replica's ``/health`` (waiting requests, KV usage: the same figures as its
``/metrics``, as JSON), polled every ``poll_s``.

Left out: retrying a failed request on another replica (a request may have had side effects on the
first: the client decides), sticky sessions by user, and HTTP/2 to the replicas.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from typing import Any, AsyncIterator, Mapping

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.policies import Admission, Policy, ReplicaLoad, RouteRequest

PASS_HEADERS = ("content-type", "retry-after", "x-request-id")


def error(status: int, message: str, code: str, param: str | None = None, retry_after: int | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(status, "service_unavailable")
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status, headers)


@dataclasses.dataclass
class Replica:
    name: str
    url: str
    outstanding: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    healthy: bool = False
    num_routed: int = 0

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(self.name, self.outstanding, self.num_waiting, self.kv_usage)


class Router:
    def __init__(self, replicas: Mapping[str, str], policy: Policy, tokenizer: Any, admission: Admission,
                 poll_s: float = 0.5, timeout_s: float = 600.0) -> None:
        self.replicas = {name: Replica(name, url.rstrip("/")) for name, url in replicas.items()}
        self.policy, self.tokenizer, self.admission, self.poll_s = policy, tokenizer, admission, poll_s
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0))

    def route_request(self, body: Any, chat: bool, headers: Mapping[str, str]) -> RouteRequest:
        """What the policy sees: the prompt's token ids as the replica will see them (near enough:
        only the leading blocks matter), ``max_tokens`` and the headers."""
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages: a non-empty list is required")
            text = "".join(str(m.get("content", "")) if isinstance(m, dict) else "" for m in messages)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # several prompts: the first one decides
            if isinstance(prompt, str):
                ids = self.tokenizer(prompt).input_ids
            elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                ids = prompt
            else:
                raise ValueError("prompt: a string, a list of strings or a list of token ids is required")
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        return RouteRequest(tuple(ids), int(max_tokens) if isinstance(max_tokens, int) else 16, headers)

    def choose(self, route: RouteRequest) -> Replica | None:
        live = [r for r in self.replicas.values() if r.healthy]
        return self.replicas[self.policy.choose(route, [r.load() for r in live])] if live else None

    async def forward(self, request: Request, chat: bool) -> Response:
        raw = await request.body()
        try:
            route = self.route_request(json.loads(raw), chat, {k.lower(): v for k, v in request.headers.items()})
        except (ValueError, UnicodeDecodeError) as e:
            return error(400, str(e), "invalid_request", param="messages" if chat else "prompt")
        if not self.admission.try_enter():
            return error(429, f"The cluster is overloaded: {self.admission.in_flight} requests in flight (at most "
                         f"{self.admission.max_in_flight}).", "server_overloaded", retry_after=self.admission.retry_after_s)
        replica = self.choose(route)
        if replica is None:
            self.admission.leave()
            return error(503, "no replica is ready", "no_replica", retry_after=1)
        replica.outstanding += 1
        replica.num_routed += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "x-request-id",
                                                                                "authorization")}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            upstream = await self.client.send(self.client.build_request("POST", replica.url + path, content=raw,
                                                                        headers=headers), stream=True)
        except httpx.HTTPError as e:
            self._done(replica)
            replica.healthy = False  # until the next poll says otherwise
            return error(503, f"replica {replica.name} cannot be reached ({type(e).__name__}); retry", "replica_down",
                         retry_after=1)
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() in PASS_HEADERS}
        out_headers["X-Stepserve-Replica"] = replica.name
        return StreamingResponse(self._relay(upstream, replica), status_code=upstream.status_code,
                                 headers=out_headers, media_type=upstream.headers.get("content-type"))

    async def _relay(self, upstream: httpx.Response, replica: Replica) -> AsyncIterator[bytes]:
        """Every byte as it comes; closing (the client left, or the end) closes the upstream."""
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError:  # the replica died mid-stream: end the stream with an in-band error
            yield b'data: {"error": {"message": "the replica failed mid-stream; retry", "type": ' \
                  b'"service_unavailable", "param": null, "code": "replica_down"}}\n\n'
        finally:
            await upstream.aclose()
            self._done(replica)

    def _done(self, replica: Replica) -> None:
        replica.outstanding = max(0, replica.outstanding - 1)
        self.admission.leave()

    async def refresh(self) -> None:
        """Every replica's health and load, now."""
        await asyncio.gather(*(self._poll_one(r) for r in self.replicas.values()))

    async def poll(self) -> None:
        """:meth:`refresh` every ``poll_s``, until cancelled."""
        while True:
            await asyncio.sleep(self.poll_s)
            await self.refresh()

    async def _poll_one(self, replica: Replica) -> None:
        try:
            r = await self.client.get(replica.url + "/health", timeout=2.0)
            body = r.json()
        except (httpx.HTTPError, ValueError):
            replica.healthy = False
            return
        replica.healthy = r.status_code == 200
        sched = body.get("scheduler") or {}
        replica.num_waiting = int(sched.get("num_waiting", 0))
        replica.kv_usage = float(sched.get("kv_usage", 0.0))

    def stats(self) -> dict[str, Any]:
        return {"in_flight": self.admission.in_flight, "max_in_flight": self.admission.max_in_flight,
                "num_refused": self.admission.num_refused,
                "replicas": {r.name: dataclasses.asdict(r) for r in self.replicas.values()},
                "policy": {k: v for k, v in vars(self.policy).items() if k.startswith("num_")}}


def make_router_app(router: Router) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.refresh()
        poller = asyncio.create_task(router.poll())
        yield
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await router.client.aclose()

    app = FastAPI(title="stepserve cluster router", lifespan=lifespan)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.forward(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await router.forward(request, chat=True)

    @app.get("/v1/models")
    async def models() -> Response:
        for r in router.replicas.values():
            if r.healthy:
                with contextlib.suppress(httpx.HTTPError):
                    up = await router.client.get(r.url + "/v1/models", timeout=5.0)
                    return Response(up.content, up.status_code, media_type="application/json")
        return error(503, "no replica is ready", "no_replica", retry_after=1)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = all(r.healthy for r in router.replicas.values())
        return JSONResponse({"status": "ok" if ready else "loading", **router.stats()}, 200 if ready else 503)

    return app
