"""The router alone (no Ray), served by uvicorn on a free port, in front of two real step 07 replicas
(tiny-llama, one thread each): where requests land, that the chosen replica's prefix cache is hit,
tiers, streams passed through unchanged; and in front of a slow null server: the global bound's
429 and a dead replica's 503."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import httpx
import uvicorn

from cluster.app import make_router_app
from cluster.cache import ResponseCache
from cluster.discovery import Endpoint, StaticEndpoints
from cluster.policies import Admission, PrefixAffinity, RoundRobin, Tiered, TierRule
from cluster.router import Router
from shared.config import ModelConfig
from shared.models import load_tokenizer
from tests.conftest import ROOT, SMALL_POOL, free_port

FLAGS = (*SMALL_POOL, "--threads", "1", "--max-queue-delay", "60")
TOKENIZER = load_tokenizer(ModelConfig(model="tiny-llama"))


def static(urls: dict[str, str], tiers: dict[str, str] | None = None) -> StaticEndpoints:
    return StaticEndpoints([Endpoint(n, u, (tiers or {}).get(n, "quality")) for n, u in urls.items()])


def replicas(servers: Any) -> dict[str, str]:
    # two distinct servers: the fixture keys servers by their flags
    return {"r0": servers("step07_paged_kv", "tiny-llama", *FLAGS).url,
            "r1": servers("step07_paged_kv", "tiny-llama", *FLAGS, "--max-seqs", "8").url}


@contextlib.contextmanager
def serving(router: Router) -> Iterator[str]:
    """The router's app on uvicorn in a thread (its lifespan polls the replicas); yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_router_app(router), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the router did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def disconnects(url: str) -> int:
    return httpx.get(url + "/ready", timeout=10).json()["gate"]["num_disconnects"]


def health(url: str) -> dict[str, Any]:
    return httpx.get(url + "/health", timeout=10).json()["scheduler"]


def test_prefix_affinity_sends_a_shared_prefix_to_one_replica_and_hits_its_cache(servers) -> None:
    urls = replicas(servers)
    before = {name: health(url)["prefix_cache_hits"] for name, url in urls.items()}
    router = Router(static(urls), PrefixAffinity(block_size=16, max_blocks=2), TOKENIZER, Admission(64))
    prefix = list(range(5, 5 + 40))  # two full blocks of 16 shared, then a different tail each
    landed = []
    with serving(router) as url:
        for i in range(6):
            r = httpx.post(url + "/v1/completions", json={"prompt": prefix + [100 + i, 200 + i], "max_tokens": 2},
                           timeout=60)
            assert r.status_code == 200, r.text
            landed.append(r.headers["x-stepserve-replica"])
    assert len(set(landed)) == 1, landed
    home = landed[0]
    other = "r1" if home == "r0" else "r0"
    hits = {name: health(url)["prefix_cache_hits"] - before[name] for name, url in urls.items()}
    assert hits[home] >= 5 * 32 and hits[other] == 0, hits  # every request after the first reused 2 blocks


def test_round_robin_alternates_and_streams_pass_through_unchanged(servers) -> None:
    urls = replicas(servers)
    router = Router(static(urls), RoundRobin(), TOKENIZER, Admission(64))
    body = {"prompt": "Hello there", "max_tokens": 5, "stream": True, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True}}

    got = []
    with serving(router) as url:
        for _ in range(4):
            with httpx.stream("POST", url + "/v1/completions", json=body, headers={"X-Request-Id": "abc"},
                              timeout=60) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                got.append((r.headers["x-stepserve-replica"], r.headers["x-request-id"], lines))
    assert [g[0] for g in got] == ["r0", "r1", "r0", "r1"]
    direct = httpx.post(urls["r0"] + "/v1/completions", json={**body, "stream": False}, timeout=60).json()
    for _, request_id, lines in got:
        assert request_id == "abc" and lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == direct["choices"][0]["text"]
        assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_tiered_sends_short_requests_to_the_fast_pool_and_obeys_the_header(servers) -> None:
    urls = replicas(servers)
    router = Router(static(urls, {"r0": "fast"}), Tiered(TierRule(max_fast_prompt_tokens=16, max_fast_output_tokens=8)),
                    TOKENIZER, Admission(64))
    with serving(router) as url:
        def tier_of(prompt: list[int], max_tokens: int, **headers: str) -> str:
            r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens},
                           headers=headers, timeout=60)
            assert r.status_code == 200, r.text
            return r.headers["x-stepserve-replica"]
        assert tier_of([5] * 10, 8) == "r0"  # short: fast
        assert tier_of([5] * 40, 8) == "r1"  # a long prompt: quality
        assert tier_of([5] * 10, 9) == "r1"  # many tokens asked: quality
        assert tier_of([5] * 40, 30, **{"X-Stepserve-Tier": "fast"}) == "r0"
    assert router.policy.num_routed == {"fast": 2, "quality": 2}


@contextlib.contextmanager
def null_server(*flags: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engines_compare.null_server", "--port", str(port), *flags],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "the null server did not start"
            time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait()


def test_the_global_bound_answers_429_with_retry_after_while_two_streams_are_in_flight() -> None:
    with null_server("--itl-ms", "100") as upstream:  # a 64-token stream takes 6.3 s
        router = Router(static({"null": upstream}), RoundRobin(), TOKENIZER, Admission(2, retry_after_s=3))
        with serving(router) as url, contextlib.ExitStack() as streams:
            body = {"model": "null", "prompt": "hi", "max_tokens": 64, "stream": True}
            lines = []  # held: a dropped line iterator would close its stream
            for _ in range(2):
                r = streams.enter_context(httpx.stream("POST", url + "/v1/completions", json=body, timeout=30))
                lines.append(r.iter_lines())
                assert r.status_code == 200 and next(lines[-1]).startswith("data: ")
            t0 = time.monotonic()
            refused = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=30)
            assert time.monotonic() - t0 < 4.0  # refused at once, not queued behind the 6.3 s streams
            assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
            assert refused.json()["error"]["code"] == "server_overloaded"
            assert router.stats()["num_refused"] == 1 and router.admission.in_flight == 2
        assert router.admission.in_flight == 0  # the streams' ends gave their places back


def test_a_replica_that_goes_away_is_a_retriable_503_and_is_skipped_once_down() -> None:
    with null_server() as up, null_server() as also_up:  # first, both up: both serve
        router = Router(static({"a": up, "b": also_up}), RoundRobin(), TOKENIZER, Admission(8), poll_s=60)
        with serving(router) as url:
            assert httpx.get(url + "/health").status_code == 200
            body = {"model": "null", "prompt": "hi", "max_tokens": 4}
            assert {httpx.post(url + "/v1/completions", json=body).headers["x-stepserve-replica"] for _ in range(2)} \
                == {"a", "b"}
    with null_server() as up:
        dead = f"http://127.0.0.1:{free_port()}"
        router = Router(static({"a": up, "b": dead}), RoundRobin(), TOKENIZER, Admission(8), poll_s=60)
        with serving(router) as url:
            h = httpx.get(url + "/health")
            assert h.status_code == 503 and not h.json()["replicas"]["b"]["healthy"]
            assert httpx.get(url + "/ready").status_code == 200  # the model still has a replica
            got = [httpx.post(url + "/v1/completions", json=body) for _ in range(3)]
            assert [(r.status_code, r.headers["x-stepserve-replica"]) for r in got] == [(200, "a")] * 3
            b = router.replicas["b"]
            b.healthy, b.model = True, "null"  # as if it had been up at the last poll: now connection refused
            got = [httpx.post(url + "/v1/completions", json=body) for _ in range(2)]
            assert [(r.status_code, r.headers["x-stepserve-replica"]) for r in got] == [(200, "a")] * 2
            assert not b.healthy and b.num_routed == 1  # refused once (nothing sent), retried on a, then skipped
            bad = httpx.post(url + "/v1/completions", json={**body, "model": ["null"]})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
            b.healthy, router.replicas["a"].healthy = True, False
            r = httpx.post(url + "/v1/completions", json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "replica_down" and not router.replicas["b"].healthy
            r = httpx.post(url + "/v1/completions", json=body)  # a known model with no ready replica: retry
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_replica"
            assert router.admission.in_flight == 0  # every refusal gave its place back


def test_a_model_served_by_two_tiers_is_never_cached_under_one_identity() -> None:
    with null_server() as fast, null_server() as quality:
        endpoints = StaticEndpoints([Endpoint("f", fast, "fast", "step08_quant int4"),
                                     Endpoint("q", quality, "quality", "step07_paged_kv")])
        cache = ResponseCache("redis://127.0.0.1:1/0")  # never reached: keys come first
        router = Router(endpoints, Tiered(), TOKENIZER, Admission(8), cache=cache, poll_s=60)
        with serving(router) as url:
            r = httpx.post(url + "/v1/completions", json={"model": "null", "prompt": "hi", "max_tokens": 4,
                                                          "temperature": 0})
            assert r.status_code == 200 and "x-stepserve-cache" not in r.headers
        assert cache.stats.uncacheable == 0 and cache.stats.misses == cache.stats.bypassed == 0


def test_a_client_that_leaves_mid_stream_aborts_the_request_on_the_replica(servers) -> None:
    urls = replicas(servers)
    router = Router(static({"r0": urls["r0"]}), RoundRobin(), TOKENIZER, Admission(8))
    before = disconnects(urls["r0"])
    with serving(router) as url:
        body = {"prompt": "Hello there", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 10
        while disconnects(urls["r0"]) == before or router.admission.in_flight:
            assert time.monotonic() < deadline, "the replica never saw the client leave"
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while health(urls["r0"])["num_running"]:  # aborted at its next step
        assert time.monotonic() < deadline, "the replica kept generating for a client that left"
        time.sleep(0.05)
