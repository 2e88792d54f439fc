"""GET / serves the playground on every step; GET /debug/engine streams the engine's state from
step 04 on (404 before: no engine loop), at most 10 times a second, to at most 4 pages at once;
with concurrent requests it shows several running sequences and, from step 07, their KV blocks,
shared prefix blocks marked."""
from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from step04_kvcache.engine_view import MAX_HZ, MAX_WATCHERS
from tests.conftest import SMALL_POOL

POOL = ("--num-kv-blocks", "256", "--block-size", "4", "--max-seqs", "8")  # a pool the page draws whole
SHARED = "A long shared system prompt that every request starts with, word for word. "  # 76 tokens (bytes)


@pytest.mark.parametrize("step", ["step00_baseline", "step07_paged_kv"])
def test_every_step_serves_the_playground(servers, step: str) -> None:
    url = servers(step, "tiny-llama", *(SMALL_POOL if step == "step07_paged_kv" else ())).url
    page = httpx.get(url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="prompt"' in page.text and "/static/playground.js" in page.text
    for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
        r = httpx.get(url + "/static/" + name, timeout=10)
        assert r.status_code == 200 and kind in r.headers["content-type"], name


@pytest.mark.parametrize("step", ["step00_baseline", "step03_batching"])
def test_steps_without_an_engine_loop_have_no_engine_view(servers, step: str) -> None:
    assert httpx.get(servers(step, "tiny-llama").url + "/debug/engine", timeout=10).status_code == 404


def events(url: str, seconds: float, until=lambda: False) -> list[dict]:
    """The snapshots /debug/engine sends within ``seconds``, or until ``until()`` is true."""
    out: list[dict] = []
    deadline = time.monotonic() + seconds
    with httpx.stream("GET", url + "/debug/engine", timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
            if time.monotonic() > deadline or until():
                break
    return out


def test_the_engine_view_shows_running_sequences_and_shared_prefix_blocks(servers) -> None:
    url = servers("step07_paged_kv", "tiny-llama", *POOL).url
    body = {"max_tokens": 200, "temperature": 0, "ignore_eos": True}  # 4 x (19 shared + 50 own blocks) fit
    httpx.post(url + "/v1/completions", json={**body, "prompt": SHARED, "max_tokens": 1}, timeout=60)  # cache it
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, url + "/v1/completions", json={**body, "prompt": f"{SHARED} ({i})"},
                               timeout=120) for i in range(4)]
        seen = events(url, 3.0)
        assert all(f.result().status_code == 200 for f in futures), [f.result().text[:200] for f in futures]
    busy = [e for e in seen if len(e["running"]) > 1]
    assert busy, "never more than one running sequence"
    e = max(busy, key=lambda e: len(e["running"]))
    owners = {tuple(b[1]) for b in e["kv"]["blocks"] if len(b[1]) > 1}
    assert owners, "no block shared by two sequences"
    assert e["kv"]["whole_pool"] and len(e["kv"]["blocks"]) == 256
    assert any(e["last_step"] and e["last_step"]["tokens"] for e in busy)  # who fed how many tokens
    assert len(seen) <= 3.0 * MAX_HZ + 2  # sampled, not pushed per step


def test_more_pages_than_allowed_are_refused(servers) -> None:
    url = servers("step07_paged_kv", "tiny-llama", *SMALL_POOL).url
    with httpx.Client(timeout=30) as client:
        streams = [client.stream("GET", url + "/debug/engine") for _ in range(MAX_WATCHERS)]
        opened = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in opened)
            lines = [r.iter_lines() for r in opened]  # kept: a dropped iterator closes its connection
            assert all(next(it).startswith("data: ") for it in lines)  # each stream is live
            with client.stream("GET", url + "/debug/engine") as refused:  # a stream: a 200 would never end
                assert refused.status_code == 429
        finally:
            for s in streams:
                s.__exit__(None, None, None)


def test_a_slow_page_is_dropped_not_buffered_for() -> None:
    """The stream makes the next snapshot only once the page took the last one; a page that took
    longer than DROP_AFTER_S is dropped (its watcher slot freed) instead of being queued for."""
    import asyncio
    import types

    from step04_kvcache.engine_view import DROP_AFTER_S, EngineView

    view = EngineView()
    engine = types.SimpleNamespace(core=None, error=lambda: None)  # loading: a one-field snapshot

    async def consume() -> list[bytes]:
        stream = view.stream(engine)  # type: ignore[arg-type]
        got = [await stream.__anext__(), await stream.__anext__()]  # a page that keeps up
        assert view.watchers == 1
        await asyncio.sleep(DROP_AFTER_S + 0.3)  # then stops reading for a while
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return got

    got = asyncio.run(consume())
    assert all(g.startswith(b"data: ") for g in got) and view.watchers == 0


def test_step_09s_view_shows_each_sequences_drafts(servers) -> None:
    url = servers("step09_speculative", "tiny-llama", *SMALL_POOL, "--speculative-max-verify-tokens", "0").url
    prompt = "one two three four " * 8  # repetitive: the n-gram proposer drafts
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(httpx.post, url + "/v1/completions", json={"prompt": prompt, "max_tokens": 300,
                   "temperature": 0, "ignore_eos": True}, timeout=120) for _ in range(2)]
        seen = events(url, 120.0, until=lambda: all(f.done() for f in futures))  # the whole generation
        assert all(f.result().status_code == 200 for f in futures)
    drafted = [d for e in seen for d in e.get("drafts", {}).values()]  # [last, kept last, so far, kept so far]
    assert drafted, "no running sequence ever showed its drafts"
    assert all(0 <= kept <= n and 0 <= total_kept <= total and n <= total for n, kept, total, total_kept in drafted)
