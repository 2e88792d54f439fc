"""The router's optional response cache, on Redis: a deterministic request asked again is answered
from the cache, streamed or not, without reaching a replica.

Central rule: only a request whose answer is a function of its body is cached (``temperature`` 0,
or an integer ``seed``; no log-probabilities, no ``echo``, no ``timeout``, whose cut depends on the
clock), under a key that hashes the endpoint, the body less what does not change the answer
(``stream_options``, ``user``) and the served weights' identity. ``stream`` stays in the key: a
streamed entry keeps the text pieces as the replica streamed them, so its replay is a stream of
the same chunks, never one lump. An entry is the normalised response (each choice's text, its
pieces, ``finish_reason``, and the usage), stored with a TTL; a hit is replayed with a fresh
``id`` and ``created`` in the replicas' own shapes (``shared/responses.py``).

Redis is never needed to answer: down, slow (0.25 s socket timeouts) or failing, the cache is
bypassed (a miss that is not counted as one, a put that stores nothing), with a warning at most
every 30 s; after a failure Redis is not asked again for ``backoff_s``, so an outage costs one
timeout per back-off, not one per request.

Left out: caching log-probabilities, the prompt's tokens or ``cached_tokens`` as they would be now
(a hit replays the usage of the answer it stores), invalidation other than the TTL (a new model is
a new identity, hence new keys), a bound on Redis's memory (Redis's own ``maxmemory`` policy), and
deduplicating identical requests in flight (each miss goes to a replica).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from typing import Any, Awaitable, Callable, Iterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from shared.outputs import TextDelta
from shared.responses import ChunkBuilder, sse

log = logging.getLogger("cluster.cache")
NOT_CONTENT = ("stream_options", "user")  # fields that change neither the answer nor its chunks
NOT_CACHEABLE = ("logprobs", "top_logprobs", "echo", "prompt_logprobs", "timeout")  # when set
WARN_EVERY_S = 30.0
_FAILED = object()  # a Redis call that did not happen or did not succeed


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stored: int = 0
    bypassed: int = 0  # gets and puts that did not reach Redis: it failed, or is in its back-off
    uncacheable: int = 0  # requests that are not deterministic (``key`` returned None)


def deterministic(body: dict[str, Any]) -> bool:
    """``temperature`` 0 or an integer ``seed`` (no ``temperature`` is the server's 1.0: sampled),
    and nothing asked for that the cache does not keep (:data:`NOT_CACHEABLE`)."""
    temperature, seed = body.get("temperature"), body.get("seed")
    greedy = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0
    seeded = isinstance(seed, int) and not isinstance(seed, bool)
    return (greedy or seeded) and all(body.get(f) is None or body.get(f) is False for f in NOT_CACHEABLE)


def normalise(response: dict[str, Any]) -> dict[str, Any] | None:
    """An entry from a replica's JSON body or :meth:`StreamCollector.result` (the same form); None
    where it is not a whole answer (an error, a choice without ``finish_reason``)."""
    if not isinstance(response, dict):
        return None
    chat = str(response.get("object") or "").startswith("chat.completion")
    choices = []
    for c in response.get("choices") or ():
        if not isinstance(c, dict) or c.get("finish_reason") is None:
            return None
        text = (c.get("message") or {}).get("content") if chat else c.get("text")
        choice: dict[str, Any] = {"index": int(c.get("index", 0)), "finish_reason": c["finish_reason"]}
        pieces = c.get("pieces")
        if isinstance(pieces, list) and all(isinstance(p, str) for p in pieces) and "".join(pieces) == (text or ""):
            choice["pieces"] = pieces  # as streamed (a stream's entry only)
        if chat:
            choice["message"] = {"role": "assistant", "content": text or ""}
        else:
            choice["text"] = text or ""
        choices.append(choice)
    if not choices:
        return None
    return {"object": "chat.completion" if chat else "text_completion", "model": response.get("model"),
            "choices": sorted(choices, key=lambda c: c["index"]), "usage": response.get("usage")}


class ResponseCache:
    def __init__(self, url: str, ttl_s: int = 3600, prefix: str = "stepserve:response:",
                 timeout_s: float = 0.25, backoff_s: float = 1.0) -> None:
        """``url``: ``redis://host:port/db``; ``timeout_s``: connect and read timeouts (a whole call
        is bounded by twice that); ``backoff_s``: how long Redis is left alone after a failure."""
        self.ttl_s, self.prefix, self.timeout_s, self.backoff_s = ttl_s, prefix, timeout_s, backoff_s
        self.redis = aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                             retry=Retry(NoBackoff(), 0))
        self.stats = CacheStats()
        self._down_until = 0.0  # monotonic: skip Redis until then
        self._warned_at = -WARN_EVERY_S

    def key(self, body: dict[str, Any], chat: bool, identity: str) -> str | None:
        """The entry's key, or None (counted ``uncacheable``) for a request that is not deterministic."""
        if not isinstance(body, dict) or not deterministic(body):
            self.stats.uncacheable += 1
            return None
        content = {k: v for k, v in body.items() if k not in NOT_CONTENT}
        canonical = json.dumps({"endpoint": "chat" if chat else "completions", "body": content,
                                "identity": identity}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return self.prefix + hashlib.blake2b(canonical.encode(), digest_size=32).hexdigest()

    async def get(self, key: str, need_usage: bool = False) -> dict[str, Any] | None:
        """The entry, or None: a miss, or Redis bypassed. ``need_usage`` (a plain request, or a stream
        with ``include_usage``): an entry without usage (from a stream that did not ask for it) is a
        miss, to be replaced by this request's answer."""
        raw = await self._call(lambda: self.redis.get(key))
        if raw is _FAILED:
            return None
        try:
            entry = json.loads(raw) if raw is not None else None
        except (ValueError, TypeError):
            entry = None
        if not isinstance(entry, dict) or (need_usage and entry.get("usage") is None):
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return entry

    async def put(self, key: str, response: dict[str, Any]) -> None:
        """Store a whole answer (a replica's JSON body or a collected stream) for ``ttl_s``."""
        entry = normalise(response)
        if entry is None:
            return
        data = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
        if await self._call(lambda: self.redis.set(key, data, ex=self.ttl_s)) is not _FAILED:
            self.stats.stored += 1

    async def close(self) -> None:
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self.redis.aclose()

    async def _call(self, command: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis command, or return ``_FAILED`` (counted ``bypassed``) without raising."""
        if time.monotonic() < self._down_until:
            self.stats.bypassed += 1
            return _FAILED
        try:
            return await asyncio.wait_for(command(), self.timeout_s * 2)
        except (aioredis.RedisError, OSError, asyncio.TimeoutError) as e:
            self.stats.bypassed += 1
            self._down_until = time.monotonic() + self.backoff_s
            if time.monotonic() - self._warned_at >= WARN_EVERY_S:
                self._warned_at = time.monotonic()
                log.warning("response cache bypassed: Redis failed (%s: %s); retrying in %.1f s",
                            type(e).__name__, e, self.backoff_s)
            return _FAILED


def replay_json(entry: dict[str, Any], chat: bool, model: str) -> bytes:
    """A hit as a replica's non-streamed body (fresh ``id``, ``created`` now), as JSONResponse writes it."""
    results = {c["index"]: (_text(c, chat), c["finish_reason"], []) for c in entry["choices"]}
    body = ChunkBuilder(chat, model, None).final(results, 0, 0)
    body["usage"] = entry.get("usage")  # as the replica counted it
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def replay_sse(entry: dict[str, Any], chat: bool, model: str, include_usage: bool) -> Iterator[bytes]:
    """A hit as a replica's stream: (chat) every choice's role chunk, then per choice its pieces as
    streamed, the last one with its ``finish_reason`` (the shape of a replica's last chunk), the
    usage chunk if ``include_usage``, then ``[DONE]``."""
    builder = ChunkBuilder(chat, model, None)
    if chat:
        for c in entry["choices"]:
            yield sse(builder.role_chunk(c["index"]))
    for c in entry["choices"]:
        pieces = c.get("pieces") or [_text(c, chat)]
        for k, piece in enumerate(pieces):
            finish = c["finish_reason"] if k == len(pieces) - 1 else None
            yield sse(builder.chunk(c["index"], TextDelta(piece, [], [], [], finish)))
    if include_usage:
        yield sse({**builder.usage_chunk(0, 0), "usage": entry.get("usage")})
    yield sse("[DONE]")


def replay(entry: dict[str, Any], chat: bool, stream: bool, model: str, include_usage: bool) -> bytes | Iterator[bytes]:
    """:func:`replay_sse` if ``stream``, else :func:`replay_json`."""
    return replay_sse(entry, chat, model, include_usage) if stream else replay_json(entry, chat, model)


def _text(choice: dict[str, Any], chat: bool) -> str:
    return choice["message"]["content"] if chat else choice["text"]


class StreamCollector:
    """Rebuilds the whole answer from a replica's SSE bytes as the router relays them, cut anywhere."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self._buffer = b""
        self._texts: dict[int, list[str]] = {}
        self._finish: dict[int, str | None] = {}
        self._usage: dict[str, Any] | None = None
        self._model: str | None = None
        self._done = self._failed = False

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")  # UTF-8 never has a newline inside a character
        for line in lines:
            if line.startswith(b"data:") and not (self._done or self._failed):
                self._event(line[5:].strip())

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]":
            self._done = True
            return
        try:
            event = json.loads(data)
        except ValueError:
            self._failed = True
            return
        if not isinstance(event, dict) or "error" in event:
            self._failed = True
            return
        self._model = event.get("model", self._model)
        if event.get("usage"):
            self._usage = event["usage"]
        for c in event.get("choices") or ():
            i = int(c.get("index", 0))
            text = (c.get("delta") or {}).get("content") if self.chat else c.get("text")
            self._texts.setdefault(i, []).append(text or "")
            if c.get("finish_reason") is not None or i not in self._finish:
                self._finish[i] = c.get("finish_reason")

    def result(self) -> dict[str, Any] | None:
        """The answer in a replica's non-streamed form (less ``id``, ``created`` and log-probabilities),
        or None where the stream did not end with ``[DONE]``, carried an error, or left a choice unfinished."""
        if not self._done or self._failed:
            return None
        choices = [{"index": i, "finish_reason": self._finish[i], "pieces": [p for p in t if p] or [""],
                    **({"message": {"role": "assistant", "content": "".join(t)}} if self.chat
                       else {"text": "".join(t)})} for i, t in sorted(self._texts.items())]
        return normalise({"object": "chat.completion" if self.chat else "text_completion", "model": self._model,
                          "choices": choices, "usage": self._usage})
