"""The router's response cache on a real Redis (Debian's ``redis-server`` on a free loopback port,
no persistence, installed with apt-get where missing and possible, stopped at the end whatever
happens): which requests are cacheable and under which key, the round trip and its TTL, an outage
(nobody listening, a server that does not answer) as a fast bypass that never raises, streams
rebuilt from bytes cut anywhere, and replays whose shape is a real step 04 server's, event for event."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import httpx
import pytest
import redis

from cluster.cache import ResponseCache, StreamCollector, replay, replay_json, replay_sse
from shared.outputs import TextDelta
from shared.responses import ChunkBuilder, sse
from tests.conftest import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 8}
COMPLETION = {"prompt": "Once upon a time", "temperature": 0, "max_tokens": 8}
ENTRY = {"object": "chat.completion", "model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                                             "total_tokens": 7},
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "Héllo wörld"},
                      "finish_reason": "length"}]}


def test_the_key_ignores_stream_options_and_user_and_changes_with_stream_content_identity_and_seed() -> None:
    cache = ResponseCache("redis://127.0.0.1:1/0")  # never connects: keys are computed locally
    key = cache.key(CHAT, True, "tiny-llama@abc")
    assert key is not None and key.startswith("stepserve:response:") and len(key) == len("stepserve:response:") + 64
    streamed = {**CHAT, "stream": True}
    assert cache.key({**streamed, "stream_options": {"include_usage": True}, "user": "ann"}, True, "tiny-llama@abc") \
        == cache.key(streamed, True, "tiny-llama@abc") != key  # a stream's entry keeps its chunks: its own key
    assert cache.key(dict(reversed(CHAT.items())), True, "tiny-llama@abc") == key  # canonical: order is irrelevant
    others = [cache.key({**CHAT, "messages": [{"role": "user", "content": "Ho"}]}, True, "tiny-llama@abc"),
              cache.key(CHAT, True, "tiny-llama@def"),  # other weights
              cache.key(CHAT, False, "tiny-llama@abc"),  # other endpoint
              cache.key({**CHAT, "max_tokens": 9}, True, "tiny-llama@abc")]
    assert len({key, *others}) == 5
    seeded = {**CHAT, "temperature": 0.8}
    a, b = cache.key({**seeded, "seed": 1}, True, "x"), cache.key({**seeded, "seed": 2}, True, "x")
    assert a is not None and b is not None and a != b
    assert cache.stats.uncacheable == 0


def test_sampled_or_logprob_requests_are_not_cacheable_and_are_counted() -> None:
    cache = ResponseCache("redis://127.0.0.1:1/0")
    no_temperature = {k: v for k, v in COMPLETION.items() if k != "temperature"}  # the server's 1.0
    refused = [no_temperature, {**COMPLETION, "temperature": 0.7}, {**no_temperature, "seed": True},
               {**COMPLETION, "logprobs": 0}, {**COMPLETION, "echo": True}, {**COMPLETION, "timeout": 5.0}]
    assert [cache.key(b, False, "x") for b in refused] == [None] * len(refused)
    assert cache.key({**CHAT, "logprobs": True, "top_logprobs": 2}, True, "x") is None
    assert cache.stats.uncacheable == len(refused) + 1
    assert cache.key({**CHAT, "logprobs": False, "echo": False}, True, "x") is not None  # off is fine
    assert cache.key({**no_temperature, "seed": 7}, False, "x") is not None
    assert cache.stats.uncacheable == len(refused) + 1


def test_put_then_get_round_trips_with_a_ttl_and_counts_hits_misses_and_stores(redis_url: str) -> None:
    async def scenario() -> tuple[Any, Any, Any, ResponseCache]:
        cache = ResponseCache(redis_url, ttl_s=60, prefix="test:round-trip:")
        key = cache.key(CHAT, True, "x")
        assert key is not None
        missed = await cache.get(key)
        await cache.put(key, {**ENTRY, "id": "chatcmpl-1", "created": 1, "choices": [
            {**ENTRY["choices"][0], "logprobs": None}]})  # a replica's body: normalised on the way in
        hit = await cache.get(key)
        await cache.put(key + "-unfinished", {**ENTRY, "choices": [{**ENTRY["choices"][0], "finish_reason": None}]})
        await cache.close()
        return missed, hit, key, cache

    missed, hit, key, cache = asyncio.run(scenario())
    assert missed is None and hit == ENTRY
    assert cache.stats.hits == 1 and cache.stats.misses == 1 and cache.stats.stored == 1 and cache.stats.bypassed == 0
    server = redis.Redis.from_url(redis_url)
    assert 0 < server.ttl(key) <= 60
    assert not server.exists(key + "-unfinished")  # only whole answers are stored


def test_an_entry_without_usage_misses_only_where_usage_is_needed(redis_url: str) -> None:
    async def scenario() -> tuple[Any, Any, ResponseCache]:
        cache = ResponseCache(redis_url, prefix="test:usage:")
        await cache.put("test:usage:k", {**ENTRY, "usage": None})  # from a stream without include_usage
        got = await cache.get("test:usage:k"), await cache.get("test:usage:k", need_usage=True)
        await cache.close()
        return *got, cache

    plain, needing, cache = asyncio.run(scenario())
    assert plain == {**ENTRY, "usage": None} and needing is None
    assert cache.stats.hits == 1 and cache.stats.misses == 1


def timed(cache: ResponseCache, *calls: str) -> list[tuple[Any, float]]:
    """Run ``get`` or ``put`` calls in turn on one event loop: each one's result and seconds."""
    async def scenario() -> list[tuple[Any, float]]:
        out = []
        for call in calls:
            t0 = time.monotonic()
            result = await (cache.get("k") if call == "get" else cache.put("k", ENTRY))
            out.append((result, time.monotonic() - t0))
        await cache.close()
        return out

    return asyncio.run(scenario())


def test_nobody_listening_is_a_fast_bypass_that_never_raises_and_warns_once(caplog) -> None:
    cache = ResponseCache(f"redis://127.0.0.1:{free_port()}/0", backoff_s=0.0)  # every call tries Redis
    with caplog.at_level(logging.WARNING, logger="cluster.cache"):
        out = timed(cache, "get", "put", "get")
    assert [r for r, _ in out] == [None, None, None] and max(t for _, t in out) < 1.0
    assert cache.stats.bypassed == 3 and cache.stats.misses == cache.stats.hits == cache.stats.stored == 0
    assert len([r for r in caplog.records if r.name == "cluster.cache"]) == 1


def test_a_redis_that_does_not_answer_costs_one_timeout_then_its_back_off_costs_nothing() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cache = ResponseCache(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", backoff_s=5.0)
        (first, t_first), (second, t_second), (_, t_put) = timed(cache, "get", "get", "put")
    assert first is None and second is None
    assert 0.2 <= t_first < 1.0  # the 0.25 s read timeout, once
    assert t_second < 0.15 and t_put < 0.15  # in the back-off: Redis is not asked (a timeout would be >= 0.25)
    assert cache.stats.bypassed == 3


def test_a_paused_redis_is_bypassed_then_used_again_after_the_back_off(redis_url: str) -> None:
    server = redis.Redis.from_url(redis_url)

    async def scenario(cache: ResponseCache) -> list[Any]:
        await cache.put("test:pause:k", ENTRY)
        server.execute_command("CLIENT", "PAUSE", 600, "ALL")  # answers no client for 0.6 s
        during = [await cache.get("test:pause:k"), await cache.get("test:pause:k")]
        await asyncio.sleep(0.7)
        after = await cache.get("test:pause:k")
        await cache.close()
        return [*during, after]

    cache = ResponseCache(redis_url, backoff_s=0.3)
    assert asyncio.run(scenario(cache)) == [None, None, ENTRY]
    assert cache.stats.bypassed == 2 and cache.stats.hits == 1 and cache.stats.stored == 1


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def collect(chat: bool, pieces: list[bytes]) -> dict[str, Any] | None:
    collector = StreamCollector(chat)
    for piece in pieces:
        collector.feed(piece)
    return collector.result()


def test_the_collector_rebuilds_a_stream_cut_every_7_bytes_and_refuses_one_unfinished_or_failed() -> None:
    b = ChunkBuilder(False, "m", None)  # the replicas' own chunks: two choices, interleaved, multi-byte text
    events = [b.chunk(0, TextDelta("Hé", [], [], [], None)), b.chunk(1, TextDelta("Ö", [], [], [], None)),
              b.chunk(0, TextDelta("llo", [], [], [], "length")), b.chunk(1, TextDelta("", [], [], [], "stop")),
              b.usage_chunk(3, 4)]
    body = b"".join(sse(e) for e in events)
    got = collect(False, split(body + sse("[DONE]"), 7))
    assert got == {"object": "text_completion", "model": "m", "usage": b.usage_chunk(3, 4)["usage"],
                   "choices": [{"index": 0, "text": "Héllo", "finish_reason": "length", "pieces": ["Hé", "llo"]},
                               {"index": 1, "text": "Ö", "finish_reason": "stop", "pieces": ["Ö"]}]}
    assert collect(False, split(body, 7)) is None  # no [DONE]: the replica went away
    failed = sse(events[0]) + b'data: {"error": {"message": "x"}}\n\n' + sse("[DONE]")
    assert collect(False, split(failed, 7)) is None
    unfinished = sse(events[0]) + sse(events[1]) + sse(events[2]) + sse("[DONE]")
    assert collect(False, [unfinished]) is None  # choice 1 never finished


def test_a_streamed_replay_collects_back_to_its_entry_and_a_plain_one_has_openais_shape() -> None:
    events = list(replay_sse(ENTRY, True, "m", include_usage=True))
    assert events[-1] == b"data: [DONE]\n\n" and all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    whole = {**ENTRY, "choices": [{**c, "pieces": [c["message"]["content"]]} for c in ENTRY["choices"]]}
    assert collect(True, split(b"".join(events), 7)) == whole
    assert b"usage" not in b"".join(replay_sse(ENTRY, True, "m", include_usage=False))
    body = json.loads(replay_json(ENTRY, True, "m"))
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert abs(body["created"] - time.time()) < 5 and body["model"] == "m" and body["usage"] == ENTRY["usage"]
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "length",
                                "message": {"role": "assistant", "content": "Héllo wörld"}}]
    assert json.loads(replay(ENTRY, True, False, "m", False))["id"] != body["id"]  # fresh each time
    entry = {**ENTRY, "object": "text_completion", "choices": [{"index": 0, "text": "ab", "finish_reason": "stop"}]}
    plain = json.loads(replay_json(entry, False, "m"))
    assert plain["id"].startswith("cmpl-") and plain["object"] == "text_completion"
    assert plain["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop", "text": "ab"}]


def shape(event: bytes) -> Any:
    """What a client relies on in one SSE event: its object, keys, and each choice's keys, delta keys
    and whether it finishes; ``DONE`` for the end."""
    data = event.removeprefix(b"data: ").strip()
    if data == b"[DONE]":
        return "DONE"
    obj = json.loads(data)
    return obj["object"], tuple(sorted(obj)), tuple((tuple(sorted(c)), tuple(sorted(c.get("delta", {}))),
                                                     c["finish_reason"] is not None) for c in obj["choices"])


def is_middle(s: Any) -> bool:
    """A chunk of text that does not finish its choice: a replica sends one per token, a replay none."""
    return s != "DONE" and bool(s[2]) and all(not finishes and "role" not in delta for _, delta, finishes in s[2])


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_replays_have_the_shape_of_a_real_step04_servers_answers(servers, chat: bool) -> None:
    url = servers("step04_kvcache", "tiny-llama", "--threads", "1").url
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {k: v for k, v in (CHAT if chat else COMPLETION).items() if k != "model"}
    body.update(max_tokens=6, ignore_eos=True, n=2)
    collector, raw = StreamCollector(chat), b""
    with httpx.stream("POST", url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      timeout=60) as r:
        assert r.status_code == 200
        for piece in r.iter_raw():
            collector.feed(piece)
            raw += piece
    entry = collector.result()
    assert entry is not None and entry["usage"] is not None
    served = [shape(e + b"\n\n") for e in raw.split(b"\n\n") if e]
    replay_events = list(replay_sse(entry, chat, entry["model"], include_usage=True))
    replayed = [shape(e) for e in replay_events]
    assert sum(is_middle(s) for s in served) >= 2  # streamed token by token, and replayed so
    assert sorted(map(repr, replayed)) == sorted(map(repr, served))  # the same events (choices not interleaved)
    assert collect(chat, split(b"".join(replay_events), 5)) == entry
    texts = [c["message"]["content"] if chat else c["text"] for c in entry["choices"]]
    assert all(texts) and len(texts) == 2
    plain = httpx.post(url + path, json=body, timeout=60).json()  # the same content, not streamed
    again = json.loads(replay_json(entry, chat, entry["model"]))
    assert {k: v for k, v in again.items() if k not in ("id", "created")} == \
        {k: v for k, v in plain.items() if k not in ("id", "created")}
