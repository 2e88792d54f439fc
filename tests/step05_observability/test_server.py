"""Step 05 over HTTP: /metrics counts what was served, X-Request-Id is used and echoed, JSON log lines."""
from __future__ import annotations

import concurrent.futures
import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

STEP, MODEL = "step05_observability", "tiny-llama"
FLAGS = ("--threads", "1")


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics, labels folded into the name: ``name{k="v"}``."""
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def log_lines(server) -> list[dict]:
    return [json.loads(line) for line in server.log.read_text().splitlines()
            if line.startswith('{"ts"') and '"request_finished"' in line]


def test_metrics_count_a_known_load(servers) -> None:
    server = servers(STEP, MODEL, *FLAGS)
    before = scrape(server.url)
    prompts = [[5 + i] * (3 + i) for i in range(4)]  # 3, 4, 5, 6 prompt tokens
    body = lambda ids, n: {"prompt": ids, "max_tokens": n, "ignore_eos": True, "temperature": 0}  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda k: httpx.post(server.url + "/v1/completions", json=body(prompts[k], 4 + k),
                                                timeout=120), range(4)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    after = scrape(server.url)
    delta = lambda name: after[name] - before.get(name, 0.0)  # noqa: E731
    assert delta("stepserve:prompt_tokens_total") == 3 + 4 + 5 + 6
    assert delta("stepserve:generation_tokens_total") == 4 + 5 + 6 + 7
    assert delta('stepserve:request_success_total{finished_reason="length"}') == 4
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_time_per_output_token_seconds"):
        assert delta(f"stepserve:{hist}_count") == 4, hist
    assert delta("stepserve:inter_token_latency_seconds_count") == 3 + 4 + 5 + 6  # every token but the first
    assert delta("stepserve:request_generation_tokens_sum") == 22
    assert after["stepserve:num_requests_running"] == after["stepserve:num_requests_waiting"] == 0
    assert after["stepserve:kv_cache_usage_perc"] == 0 and after["process_resident_memory_bytes"] > 0


def test_gauges_show_a_request_in_flight(servers) -> None:
    server = servers(STEP, MODEL, *FLAGS)
    body = {"prompt": "Hi", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True,
            "logprobs": 1}  # a chunk per token, even while the text holds back a partial character
    with httpx.Client(timeout=60) as client, client.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()  # kept: a discarded iterator closes the connection (the client leaves)
        next(line for line in lines if line.startswith("data: "))
        now = scrape(server.url)
    assert now["stepserve:num_requests_running"] == 1 and now["stepserve:kv_cache_usage_perc"] > 0, now


def test_client_request_id_is_used_echoed_and_logged(servers) -> None:
    server = servers(STEP, MODEL, *FLAGS)
    r = httpx.post(server.url + "/v1/completions", headers={"X-Request-Id": "trace-abc.123"},
                   json={"prompt": "Hi", "max_tokens": 3, "n": 2, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-abc.123"
    s = httpx.post(server.url + "/v1/chat/completions", headers={"X-Request-Id": "chat-xyz"}, timeout=60,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True})
    assert s.status_code == 200 and s.headers["x-request-id"] == "chat-xyz" and "[DONE]" in s.text
    lines = {line["request_id"]: line for line in log_lines(server)}
    assert {"trace-abc.123-0", "trace-abc.123-1", "chat-xyz-0"} <= lines.keys(), lines.keys()
    line = lines["trace-abc.123-1"]
    assert (line["prompt_tokens"], line["output_tokens"], line["finish_reason"]) == (3, 3, "length"), line
    assert 0 <= line["queue_time_s"] <= line["ttft_s"] <= line["e2e_s"], line


def test_without_a_request_id_the_generated_one_is_echoed(servers) -> None:
    server = servers(STEP, MODEL, *FLAGS)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == r.json()["id"]
    assert any(line["request_id"] == r.json()["id"] + "-0" for line in log_lines(server))


def test_an_invalid_request_id_is_a_400_naming_the_header(servers) -> None:
    server = servers(STEP, MODEL, *FLAGS)
    for bad in ("x" * 129, "has space"):
        r = httpx.post(server.url + "/v1/completions", headers={"X-Request-Id": bad},
                       json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id", r.text
