"""``python -m cluster`` for real: two step 07 replicas (tiny-llama, one thread each) on a local Ray,
behind the router, with the response cache on a real Redis and the admin API on.

One cluster serves the module (Ray and its replicas take ~20 s to start); the tests run in file
order and the last ones are destructive (a killed replica, Redis stopped)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from engines_compare.conformance import CHECKS, connect
from engines_compare.conformance.runner import run_check
from tests.cluster.conftest import running_redis
from tests.conftest import ROOT, free_port

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHARED = " ".join(["The shared system prompt of every request in this test, word for word."] * 6)


class Cluster:
    def __init__(self, url: str, proc: subprocess.Popen, redis_proc: subprocess.Popen | None, log: Path) -> None:
        self.url, self.proc, self.redis_proc, self.log = url, proc, redis_proc, log

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health", timeout=10).json()

    def complete(self, prompt: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, **kw}, timeout=60)

    def wait_healthy(self, timeout_s: float, until: Any = lambda h: True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200 and until(r.json()):
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the cluster was not healthy in {timeout_s} s:\n{self.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    with contextlib.ExitStack() as stack:
        try:  # without a redis-server (none installed, none installable) the cache's tests skip, not the rest
            redis_url, redis_proc = stack.enter_context(running_redis(tmp))
            cache_flags = ["--redis-url", redis_url]
        except pytest.skip.Exception:
            redis_proc, cache_flags = None, []
        port, log = free_port(), tmp / "cluster.log"
        cmd = [sys.executable, "-m", "cluster", "--step", "step07_paged_kv", "--model", "tiny-llama", "--replicas", "2",
               "--threads", "1", "--ray-cpus", "8", "--port", str(port), "--log-level", "warning",
               "--policy", "prefix-affinity", "--block-size", "16", "--admin-token", TOKEN, *cache_flags,
               "--step-args", "--kv-cache-gib 0.0625 --max-queue-delay 60"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"})
        c = Cluster(f"http://127.0.0.1:{port}", proc, redis_proc, log)
        try:
            c.wait_healthy(240)
            yield c
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):  # whatever is left of Ray: same process group
                os.killpg(proc.pid, signal.SIGKILL)


def replica_urls(c: Cluster) -> dict[str, str]:
    return {name: r["url"] for name, r in c.health()["replicas"].items()}


def scheduler(url: str) -> dict[str, Any]:
    return httpx.get(url + "/health", timeout=10).json()["scheduler"]


def test_health_lists_two_ready_replicas_and_models_names_the_model(cluster: Cluster) -> None:
    h = cluster.health()
    assert h["status"] == "ok" and (h["replicas_expected"], h["replicas_ready"]) == (2, 2)
    assert {r["tier"] for r in h["replicas"].values()} == {"quality"}
    assert [m["id"] for m in httpx.get(cluster.url + "/v1/models").json()["data"]] == ["tiny-llama"]


@pytest.mark.parametrize("name", list(CHECKS))
def test_the_conformance_suite_passes_through_the_router(cluster: Cluster, name: str) -> None:
    ctx = connect(cluster.url)
    try:
        result = run_check(ctx, name)
    finally:
        ctx.http.close()
    assert result.status == "pass", f"{name}: {result.status}: {result.detail}"


def test_requests_sharing_a_prefix_land_on_one_replica_and_hit_its_prefix_cache(cluster: Cluster) -> None:
    urls = replica_urls(cluster)
    before = {n: scheduler(u)["prefix_cache_hits"] for n, u in urls.items()}
    affine = cluster.health()["policy"]["num_affine"]
    landed = [cluster.complete(f"{SHARED} Question {i}: why?", temperature=0.7).headers["x-stepserve-replica"]
              for i in range(4)]
    assert len(set(landed)) == 1, landed
    home = landed[0]
    after = {n: scheduler(u)["prefix_cache_hits"] for n, u in urls.items()}
    assert after[home] - before[home] >= 3 * 48  # three later requests found >= 3 blocks each
    assert all(after[n] == before[n] for n in urls if n != home)
    assert cluster.health()["policy"]["num_affine"] - affine >= 3  # the first may be new; the rest matched it


def needs_redis(cluster: Cluster) -> None:
    if cluster.redis_proc is None:
        pytest.skip("no redis-server here (Debian: apt-get install redis-server)")


def test_a_deterministic_request_is_answered_from_redis_the_second_time_streamed_or_not(cluster: Cluster) -> None:
    needs_redis(cluster)
    body = {"prompt": "Redis keeps the answer to this prompt", "max_tokens": 12, "temperature": 0}
    first = httpx.post(cluster.url + "/v1/completions", json=body, timeout=60)
    assert first.headers["x-stepserve-cache"] == "miss" and "x-stepserve-replica" in first.headers
    again = httpx.post(cluster.url + "/v1/completions", json=body, timeout=60)
    assert again.headers["x-stepserve-cache"] == "hit" and "x-stepserve-replica" not in again.headers
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert again.json()["usage"] == first.json()["usage"]
    streams = []
    for _ in range(2):  # a stream has its own entry, replayed chunk for chunk
        with httpx.stream("POST", cluster.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            streams.append((r.headers["x-stepserve-cache"], [line[6:] for line in r.iter_lines() if line.startswith("data: ")]))
    (miss, served), (hit, replayed) = streams
    assert (miss, hit) == ("miss", "hit") and served[-1] == replayed[-1] == "[DONE]"
    texts = [[json.loads(e)["choices"][0]["text"] for e in events[:-1]] for events in (served, replayed)]
    assert texts[0] == texts[1] and len(texts[1]) >= 2  # the same pieces: a stream, not one lump
    assert "".join(texts[1]) == first.json()["choices"][0]["text"]
    sampled = cluster.complete("Redis keeps the answer to this prompt", temperature=1.0)
    assert "x-stepserve-cache" not in sampled.headers  # not deterministic: never cached
    assert cluster.health()["cache"]["hits"] >= 2 and cluster.health()["cache"]["stored"] >= 2


def test_admin_needs_the_token_and_names_bad_fields_and_unknown_models(cluster: Cluster) -> None:
    assert httpx.post(cluster.url + "/admin/models", json={"model": "tiny-llama", "step": "step04_kvcache"}).status_code == 401
    bad = {"step": {"model": "tiny-llama", "step": "step99_magic"}, "model": {"model": "no-such-model", "step": "step04_kvcache"},
           "replicas": {"model": "tiny-llama", "step": "step04_kvcache", "replicas": 0},
           "tier": {"model": "tiny-llama", "step": "step04_kvcache", "tier": "gold"}}
    for param, body in bad.items():
        r = httpx.post(cluster.url + "/admin/models", json=body, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (param, r.text)
    for method in ("GET", "DELETE"):
        r = httpx.request(method, cluster.url + "/admin/models/nobody", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["param"] == "id"
    assert cluster.complete("hello", model="nobody").json()["error"]["code"] == "model_not_found"


def test_a_model_is_loaded_served_and_unloaded_at_runtime(cluster: Cluster) -> None:
    body = {"id": "tiny2", "model": "tiny-gemma3", "step": "step04_kvcache", "replicas": 1, "cpus": 0}
    r = httpx.post(cluster.url + "/admin/models", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 202 and r.json()["state"] == "loading", r.text
    assert httpx.post(cluster.url + "/admin/models", json=body, headers=AUTH, timeout=60).status_code == 409
    deadline = time.monotonic() + 180
    while (p := httpx.get(cluster.url + "/admin/models/tiny2", headers=AUTH, timeout=30).json())["state"] != "ready":
        assert p["state"] == "loading" and time.monotonic() < deadline, p
        time.sleep(1)
    assert {m["id"] for m in httpx.get(cluster.url + "/v1/models").json()["data"]} == {"tiny-llama", "tiny2"}
    r = cluster.complete("hello", model="tiny2")
    assert r.status_code == 200 and r.headers["x-stepserve-replica"] == "tiny2.quality.0" and r.json()["model"] == "tiny2"
    r = httpx.delete(cluster.url + "/admin/models/tiny2", headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["applications"] == ["tiny2.quality.0"]
    assert [m["id"] for m in httpx.get(cluster.url + "/v1/models").json()["data"]] == ["tiny-llama"]
    assert cluster.complete("hello", model="tiny2").status_code == 404


def step_server_pid(url: str) -> int:
    """The process listening on ``url``'s port: the replica's step server."""
    port = url.rsplit(":", 1)[1]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with_port = cmdline.read_bytes().split(b"\0")
        if b"--port" in with_port and with_port[with_port.index(b"--port") + 1] == port.encode():
            return int(cmdline.parent.name)
    raise LookupError(f"no process listens on {url}")


def test_a_killed_replica_fails_its_stream_cleanly_is_replaced_and_no_later_request_fails(cluster: Cluster) -> None:
    urls = replica_urls(cluster)
    victim = "tiny-llama.quality.0"
    stream = {"max_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 0.5}  # ~1 s of tokens
    for i in range(40):  # a prompt whose home is the victim
        prompt = f"{i} Once upon a time, in a land far away, there lived a"
        with httpx.stream("POST", cluster.url + "/v1/completions", json={"prompt": prompt, **stream}, timeout=60) as r:
            if r.headers["x-stepserve-replica"] != victim:
                continue
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            os.kill(step_server_pid(urls[victim]), signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        break
    else:
        pytest.fail("no prompt landed on the victim")
    assert json.loads(rest[-1][6:])["error"]["code"] == "replica_down"  # ended in-band, retriable
    codes = [cluster.complete(f"after the kill {i}").status_code for i in range(8)]
    assert codes == [200] * 8
    # healthy again (every replica ready), the victim at a new URL: Ray replaced it
    cluster.wait_healthy(120, until=lambda h: h["replicas"].get(victim, {}).get("url") not in (None, urls[victim]))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # new prompts spread by load: the victim serves again
        got = list(pool.map(lambda i: cluster.complete(f"{i} back again", max_tokens=64, ignore_eos=True), range(4)))
    assert all(r.status_code == 200 for r in got) and victim in {r.headers["x-stepserve-replica"] for r in got}


def test_redis_down_means_the_cache_is_bypassed_never_a_failed_request(cluster: Cluster) -> None:
    needs_redis(cluster)
    cluster.redis_proc.kill()
    cluster.redis_proc.wait()
    t0 = time.monotonic()
    codes = [cluster.complete("Redis keeps the answer to this prompt", max_tokens=12, temperature=0).status_code
             for _ in range(3)]
    assert codes == [200] * 3 and time.monotonic() - t0 < 10
    assert cluster.health()["cache"]["bypassed"] >= 3
