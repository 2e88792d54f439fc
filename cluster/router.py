"""The router: the OpenAI API in front of many replicas, one policy choosing where each request goes.

Central rule: the router reads a request only as far as it must (``model``, the prompt's leading
token ids, ``max_tokens``, headers), then forwards the body unchanged and relays the replica's
answer unchanged (status, ``Content-Type``, ``Retry-After``, ``X-Request-Id``, every SSE byte).
A client that leaves closes the upstream stream, so the replica aborts the request.

In order, a request meets: the response cache (a deterministic request answered before, replayed
without any replica), the global admission bound (429 + ``Retry-After`` before any replica
queues), the policy (among the healthy replicas serving its ``model``), and the replica. A replica
that refuses the connection is marked down and the next choice is tried (nothing was sent, so
nothing can happen twice); one that fails mid-stream ends the stream with an in-band error event,
and no later request goes to it until it answers ``/health`` again.

Replicas come from a :class:`cluster.discovery.Discovery`, asked every ``poll_s`` together with each
replica's ``/health`` (waiting requests, KV usage: its ``/metrics`` figures as JSON) and, whenever
it becomes healthy (again), its ``/v1/models`` (which model it serves); a replica that was down
may have restarted at the same address, so the policy then forgets what it had sent there.

Left out: retrying a request that reached a replica (it may have had effects: the client
decides), sticky sessions by user, and HTTP/2 to the replicas.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any, AsyncIterator, Mapping

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from cluster.cache import ResponseCache, StreamCollector, replay
from cluster.discovery import Discovery, Endpoint
from cluster.policies import Admission, Policy, RouteRequest
from cluster.replica import Replica, error

log = logging.getLogger("stepserve.cluster")
PASS_HEADERS = ("content-type", "retry-after", "x-request-id")
UNBOUNDED = 1 << 30  # no max_tokens: as long as the context allows
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # the request never left: retry elsewhere
FORWARD_HEADERS = ("content-type", "x-request-id", "authorization")


class Router:
    def __init__(self, discovery: Discovery, policy: Policy, tokenizer: Any, admission: Admission,
                 cache: ResponseCache | None = None, poll_s: float = 0.5, timeout_s: float = 600.0) -> None:
        self.discovery, self.policy, self.tokenizer = discovery, policy, tokenizer
        self.admission, self.cache, self.poll_s = admission, cache, poll_s
        self.replicas: dict[str, Replica] = {}
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=2.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    # -- what the policy sees -------------------------------------------------------------------
    def route_request(self, body: Any, chat: bool, headers: Mapping[str, str]) -> RouteRequest:
        """The prompt's token ids as the replica will see them (near enough: only the leading
        blocks matter), ``max_tokens`` and the headers."""
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
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                ids = prompt
            else:
                raise ValueError("prompt: a string, a list of strings or a list of token ids is required")
        # the servers' defaults: completions 16; chat what the context leaves (max_completion_tokens first)
        limit = (body.get("max_completion_tokens") or body.get("max_tokens")) if chat else body.get("max_tokens", 16)
        return RouteRequest(tuple(ids), limit if isinstance(limit, int) and limit > 0 else UNBOUNDED, headers)

    def models(self) -> dict[str, list[Replica]]:
        """Model id -> its replicas (healthy or not), in discovery order."""
        found: dict[str, list[Replica]] = {}
        for r in self.replicas.values():
            if r.model is not None:
                found.setdefault(r.model, []).append(r)
        return found

    def choose(self, route: RouteRequest, model: str, exclude: set[str]) -> Replica | None:
        """Among the healthy replicas of ``model`` now (the poll may have changed them since the
        request arrived)."""
        live = {r.name: r for r in self.replicas.values() if r.model == model and r.healthy and r.name not in exclude}
        return live[self.policy.choose(route, [r.load() for r in live.values()])] if live else None

    # -- one request ----------------------------------------------------------------------------
    async def forward(self, request: Request, chat: bool) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            route = self.route_request(body, chat, {k.lower(): v for k, v in request.headers.items()})
        except (ValueError, UnicodeDecodeError) as e:
            return error(400, str(e), "invalid_request", param="messages" if chat else "prompt")
        models = self.models()
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            return error(400, "model: a string is required", "invalid_request", param="model")
        known = set(models) | self.discovery.model_ids()
        if name is not None and name not in known:
            return error(404, f"The model `{name}` does not exist.", "model_not_found", param="model")
        if name is None and models:
            name = next(iter(models))
        if name not in models or not any(r.healthy for r in models[name]):
            return error(503, f"no replica of `{name}` is ready; retry", "no_replica", retry_after=1)
        identities = {r.cache_identity() for r in models[name]}  # tiers of one id differ: never mix them
        key = self.cache.key(body, chat, identities.pop()) if self.cache and len(identities) == 1 else None
        if key is not None and (hit := await self._cached(key, body, chat, name,
                                                            request.headers.get("x-request-id"))) is not None:
            return hit
        if not self.admission.try_enter():
            return error(429, f"The cluster is overloaded: {self.admission.in_flight} requests in flight (at most "
                         f"{self.admission.max_in_flight}).", "server_overloaded", retry_after=self.admission.retry_after_s)
        handed_off = False  # once _whole or _relay owns the request, they give the slot back
        try:
            tried: set[str] = set()
            while (replica := self.choose(route, name, tried)) is not None:
                tried.add(replica.name)
                try:
                    upstream = await self._send(replica, raw, request, chat)
                except NOT_SENT as e:
                    log.warning("replica %s cannot be reached (%s); trying another", replica.name, type(e).__name__)
                    continue
                except httpx.HTTPError as e:  # it may have reached the replica: the client decides
                    return error(503, f"replica {replica.name} failed ({type(e).__name__}); retry", "replica_down",
                                 retry_after=1)
                handed_off = True
                out = {k: v for k, v in upstream.headers.items() if k.lower() in PASS_HEADERS}
                out["X-Stepserve-Replica"] = replica.name
                if key is not None:
                    out["X-Stepserve-Cache"] = "miss"
                collect = key if upstream.status_code == 200 else None
                if not body.get("stream"):
                    return await self._whole(upstream, replica, collect, out, request)
                return StreamingResponse(self._relay(upstream, replica, collect, chat),
                                         status_code=upstream.status_code, headers=out,
                                         media_type=upstream.headers.get("content-type"))
            return error(503, f"no replica of `{name}` can be reached; retry", "replica_down", retry_after=1)
        finally:
            if not handed_off:
                self.admission.leave()

    async def _send(self, replica: Replica, raw: bytes, request: Request, chat: bool) -> httpx.Response:
        """The request to one replica, its response's headers read; counted as outstanding on it
        from here until :meth:`_done` (a failure here undoes it and marks the replica down)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_HEADERS}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        replica.outstanding += 1
        replica.num_routed += 1
        try:
            return await self.client.send(self.client.build_request("POST", replica.url + path, content=raw,
                                                                    headers=headers), stream=True)
        except BaseException as e:  # also a client that left before the answer began
            replica.outstanding = max(0, replica.outstanding - 1)
            if isinstance(e, httpx.HTTPError):
                replica.healthy = False  # until its /health says otherwise
            raise

    async def _cached(self, key: str, body: dict[str, Any], chat: bool, model: str,
                      request_id: str | None) -> Response | None:
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        entry = await self.cache.get(key, need_usage=include_usage or not stream) if self.cache else None
        if entry is None:
            return None
        headers = {"X-Stepserve-Cache": "hit", **({"X-Request-Id": request_id} if request_id else {})}
        out = replay(entry, chat, stream, model, include_usage)
        if stream:
            return StreamingResponse(out, headers=headers, media_type="text/event-stream")  # type: ignore[arg-type]
        return Response(out, headers=headers, media_type="application/json")  # type: ignore[arg-type]

    async def _whole(self, upstream: httpx.Response, replica: Replica, key: str | None,
                     headers: dict[str, str], request: Request) -> Response:
        """A non-streamed answer is one JSON body: read it whole, so a replica dying half-way is a
        clean, retriable 503 rather than a truncated body; a client that leaves meanwhile closes
        the upstream, so the replica aborts (as for a stream)."""
        read = asyncio.ensure_future(upstream.aread())
        try:
            while not (await asyncio.wait({read}, timeout=0.25))[0]:
                if await request.is_disconnected():
                    read.cancel()
                    return Response(status_code=499)  # nobody is listening
            content = read.result()
        except httpx.HTTPError:
            replica.healthy = False
            return error(503, f"replica {replica.name} failed while answering; retry", "replica_down", retry_after=1)
        finally:
            if not read.done():
                read.cancel()
            await upstream.aclose()
            self._done(replica)
        if key is not None and self.cache is not None and (entry := _json_entry(content)) is not None:
            await self.cache.put(key, entry)
        return Response(content, upstream.status_code, headers=headers, media_type=upstream.headers.get("content-type"))

    async def _relay(self, upstream: httpx.Response, replica: Replica, key: str | None,
                     chat: bool) -> AsyncIterator[bytes]:
        """Every byte as it comes; closing (the client left, or the end) closes the upstream. A
        complete answer to a cacheable request is stored once it has been relayed."""
        collector, complete = StreamCollector(chat), False
        try:
            async for chunk in upstream.aiter_raw():
                if key is not None:
                    collector.feed(chunk)
                yield chunk
            complete = True
        except httpx.HTTPError:  # the replica died mid-stream: end the stream with an in-band error
            replica.healthy = False
            yield b'data: {"error": {"message": "the replica failed mid-stream; retry", "type": ' \
                  b'"service_unavailable", "param": null, "code": "replica_down"}}\n\n'
        finally:
            await upstream.aclose()
            self._done(replica)
        if complete and key is not None and self.cache is not None and (entry := collector.result()) is not None:
            await self.cache.put(key, entry)

    def _done(self, replica: Replica) -> None:
        replica.outstanding = max(0, replica.outstanding - 1)
        self.admission.leave()

    # -- replicas -------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Ask discovery where the replicas are, then every replica's health and load, now."""
        try:
            unreachable = frozenset(r.name for r in self.replicas.values() if not r.healthy)
            found = await asyncio.wait_for(self.discovery.endpoints(unreachable), timeout=5.0)
        except Exception as e:  # a discovery hiccup keeps the replicas we knew
            log.warning("discovery failed (%s: %s); keeping %d known replicas", type(e).__name__, e, len(self.replicas))
            found = None
        if found is not None:
            self._sync(found)
        await asyncio.gather(*(self._poll_one(r) for r in list(self.replicas.values())))

    def _sync(self, endpoints: list[Endpoint] | tuple[Endpoint, ...] | Any) -> None:
        names = set()
        for e in endpoints:
            names.add(e.name)
            r = self.replicas.get(e.name)
            if r is None or r.url != e.url:  # new, or moved (restarted on a new port): relearn it
                self.replicas[e.name] = Replica(e.name, e.url, e.tier, e.identity,
                                                num_routed=r.num_routed if r else 0)
                self._forget(e.name)  # a restarted replica's caches are empty
        for gone in set(self.replicas) - names:
            del self.replicas[gone]
            self._forget(gone)

    def _forget(self, name: str) -> None:
        if (forget := getattr(self.policy, "forget", None)) is not None:
            forget(name)

    async def poll(self) -> None:
        """:meth:`refresh` every ``poll_s``, until cancelled; a failed round is logged, not fatal."""
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("polling the replicas failed; trying again in %.1f s", self.poll_s)

    async def _poll_one(self, replica: Replica) -> None:
        was_healthy = replica.healthy
        try:
            r = await self.client.get(replica.url + "/health", timeout=2.0)
            body = r.json()
            if r.status_code == 200 and not was_healthy:  # (again): it may have restarted at the same address
                card = (await self.client.get(replica.url + "/v1/models", timeout=2.0)).json()["data"][0]
                self._forget(replica.name)  # its caches may be empty
                replica.card, replica.model = card, card["id"]
            sched = body.get("scheduler") or {}
            replica.num_waiting = int(sched.get("num_waiting", 0))
            replica.kv_usage = float(sched.get("kv_usage", 0.0))
        except Exception:  # unreachable, or an answer that is not what a step sends
            replica.healthy = False
            return
        replica.healthy = r.status_code == 200 and replica.model is not None

    def stats(self) -> dict[str, Any]:
        return {"in_flight": self.admission.in_flight, "max_in_flight": self.admission.max_in_flight,
                "num_refused": self.admission.num_refused,
                "cache": dataclasses.asdict(self.cache.stats) if self.cache else None,
                "replicas": {r.name: {k: v for k, v in dataclasses.asdict(r).items() if k != "card"}
                             for r in self.replicas.values()},
                "policy": {k: v for k, v in vars(self.policy).items() if k.startswith("num_")}}


def _json_entry(raw: bytes) -> dict[str, Any] | None:
    try:
        return json.loads(raw)  # ResponseCache.put keeps only a whole answer
    except ValueError:
        return None


if __name__ == "__main__":
    from cluster.cli import static_main

    raise SystemExit(static_main())
