"""A real Prometheus (Debian's package) scrapes step 05 every second; its numbers must equal the load sent.

The test installs Prometheus with apt-get where it is missing and this user may (root); it skips,
saying so, only where it cannot. Prometheus listens on loopback on a free port, keeps its data in
a temporary folder, and is stopped at the end whatever happens.
"""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.conftest import free_port
from engines_compare.targets import stop_process
from tests.helpers import apt_binary
from tests.step05_observability.test_ops import dashboard_exprs

STEP, MODEL = "step05_observability", "tiny-llama"
FLAGS = ("--threads", "1", "--max-seqs", "5")  # its own server: counters start at 0


@pytest.fixture
def prometheus(servers, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(Prometheus URL, step 05 URL): a Prometheus that scrapes a fresh step 05 server every second."""
    binary = apt_binary("prometheus", "prometheus", timeout_s=600)
    server = servers(STEP, MODEL, *FLAGS)
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "step05", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}]}))
    url = f"http://127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address={url.removeprefix('http://')}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: ok(url + "/-/ready"), 60,
                 lambda: f"Prometheus not ready: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
        wait_for(lambda: query(url, 'up{job="step05"}') == 1.0, 30, lambda: "Prometheus never scraped step 05")
        yield url, server.url
    finally:
        stop_process(proc, 15.0)
        log.close()


def ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(condition, timeout: float, message) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(message())
        time.sleep(0.25)


def query_raw(prom: str, expr: str) -> dict:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "success", f"{expr}: {r.text}"
    return r.json()["data"]


def query(prom: str, expr: str) -> float | None:
    """The value of a query that gives one series (None: no series yet)."""
    result = query_raw(prom, expr)["result"]
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_prometheus_scrapes_counters_equal_to_the_load_sent(prometheus) -> None:
    prom, url = prometheus
    jobs = [([7 + k] * (4 + k), 3 + 2 * k) for k in range(6)]  # (prompt token ids, max_tokens)

    def send(job: tuple[list[int], int]) -> int:
        body = {"prompt": job[0], "max_tokens": job[1], "ignore_eos": True, "temperature": 0}
        return httpx.post(url + "/v1/completions", json=body, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert list(pool.map(send, jobs)) == [200] * len(jobs)
    chat = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})
    assert chat.status_code == 200 and "[DONE]" in chat.text
    usage = [json.loads(line[6:]) for line in chat.text.splitlines() if line.startswith("data: {")][-1]["usage"]
    chat_prompt = usage["prompt_tokens"]  # the chat template's tokens, as the server reports them
    assert chat_prompt > 0 and usage["completion_tokens"] == 5
    expected = {
        "stepserve:prompt_tokens_total": sum(len(ids) for ids, _ in jobs) + chat_prompt,
        "stepserve:generation_tokens_total": sum(n for _, n in jobs) + 5,
        'stepserve:request_success_total{finished_reason="length"}': len(jobs) + 1,
        'stepserve:request_success_total{finished_reason="stop"}': 0,
        "stepserve:time_to_first_token_seconds_count": len(jobs) + 1,
        "stepserve:e2e_request_latency_seconds_count": len(jobs) + 1,
        "stepserve:inter_token_latency_seconds_count": sum(n - 1 for _, n in jobs) + 4,
    }
    seen: dict[str, float | None] = {}

    def scraped_all() -> bool:
        for name in expected:
            selector = name.replace("{", '{job="step05",') if "{" in name else name + '{job="step05"}'
            seen[name] = query(prom, selector)
        return seen == expected

    wait_for(scraped_all, 20, lambda: f"Prometheus has {seen}, expected {expected}")
    assert query(prom, 'stepserve:num_requests_running{job="step05"}') == 0


def test_every_dashboard_query_runs_in_prometheus_and_finds_series(prometheus) -> None:
    prom, url = prometheus
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200
    wait_for(lambda: (query(prom, 'stepserve:generation_tokens_total{job="step05"}') or 0) >= 8, 20,
             lambda: "the load never reached Prometheus")
    time.sleep(2)  # two more scrapes: rate() needs two samples after the change
    for title, expr in dashboard_exprs():
        data = query_raw(prom, expr.replace("$__rate_interval", "1m"))
        assert data["result"], f"{title}: {expr} found no series"
