"""Step 04 over HTTP: concurrent clients get batch-1 tokens; a dropped stream frees its row; flags."""
from __future__ import annotations

import concurrent.futures
import random
import time

import httpx

from shared.config import build_parser, from_args
from step04_kvcache.model_runner import RunnerConfig
from step04_kvcache.scheduler import SchedulerConfig
from tests.helpers import prompt_ids, reference_greedy, server_greedy

MODEL = "tiny-gemma3"
FLAGS = ("--max-seqs", "3", "--max-num-batched-tokens", "12", "--threads", "1")  # tiny model: 1 thread is faster


def test_concurrent_clients_arriving_at_random_get_batch1_tokens(servers) -> None:
    url = servers("step04_kvcache", MODEL, *FLAGS).url
    rng = random.Random("http-arrivals")
    jobs = [(prompt_ids(MODEL, f"{i}: " + "xyz " * rng.randint(0, 10)), rng.randint(3, 30), rng.random() * 0.2)
            for i in range(8)]

    def run(job: tuple[list[int], int, float]) -> list[int]:
        time.sleep(job[2])
        return server_greedy(url, job[0], job[1], stop_at_eos=False)[0]

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    for (ids, n, _), tokens in zip(jobs, got):
        assert tokens == reference_greedy(MODEL, ids, n, stop_at_eos=False)[0]


def test_dropped_http_stream_frees_its_row(servers) -> None:
    url = servers("step04_kvcache", MODEL, *FLAGS).url
    body = {"prompt": "Hi", "max_tokens": 480, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client:
        before = client.get(url + "/health").json()["num_generated_tokens"]
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
            s = client.get(url + "/health").json()["scheduler"]  # a snapshot: the stream may be anywhere
            assert s["kv_rows_total"] == 3 and s["kv_rows_used"] == s["num_running"] <= 1, s
        deadline = time.monotonic() + 30
        while client.get(url + "/health").json()["scheduler"]["kv_rows_used"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = client.get(url + "/health").json()
        s = health["scheduler"]
        assert (s["num_running"], s["num_waiting"], health["num_pending"], s["kv_usage"]) == (0, 0, 0, 0.0), health
        assert health["num_generated_tokens"] - before < 480, f"the dropped stream ran to the end: {health}"
        r = client.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_scheduler_and_cache_settings_are_flags() -> None:
    ns = build_parser("step04", "", SchedulerConfig, RunnerConfig).parse_args(
        ["--max-seqs", "8", "--max-num-batched-tokens", "64", "--kv-cache-gib", "0.5", "--linear-backend", "torch"])
    assert from_args(SchedulerConfig, ns) == SchedulerConfig(max_seqs=8, max_num_batched_tokens=64)
    assert from_args(RunnerConfig, ns) == RunnerConfig(kv_cache_gib=0.5, linear_backend="torch")


def test_a_failed_load_is_a_clear_503_on_health_and_requests(tmp_path) -> None:
    """16 rows of 400 tokens do not fit in 0.001 GiB: start() fails. /health says so (not "loading"
    forever), and requests get the reason at once."""
    from tests.conftest import Server

    srv = Server("step04_kvcache", MODEL, ("--max-model-len", "400", "--kv-cache-gib", "0.001"), tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(srv.url + "/health", timeout=5)
                if health.json()["status"] != "loading":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log.read_text()[-2000:]
            time.sleep(0.2)
        assert health.status_code == 503 and health.json()["status"] == "failed", health.text
        assert "max_model_len" in health.json()["error"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
        assert "max_model_len" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_a_seed_torch_refuses_is_a_400_and_the_engine_goes_on(servers) -> None:
    """Choice 1 of n=2 would seed 2**64: refused up front, naming the field; the engine thread
    (which one such seed used to kill) still serves."""
    url = servers("step04_kvcache", MODEL, *FLAGS).url
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "n": 2, "seed": 2**64 - 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    ok = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "seed": 2**64 - 1}, timeout=60)
    assert ok.status_code == 200 and httpx.get(url + "/health").json()["status"] == "ok"
