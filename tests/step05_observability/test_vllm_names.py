"""``--metrics-namespace vllm``: the series vLLM also has are scraped under vLLM's exact names and
labels, the list below taken from vLLM's documentation (its "Production Metrics" page, generated
from ``vllm/v1/metrics/loggers.py``; vLLM 0.32); the others keep the ``stepserve:`` prefix."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import Counter, generate_latest

from step05_observability.metrics import PREFIX, new_registry
from tests.conftest import SMALL_POOL

# As vLLM exposes them (counters with their _total sample suffix stripped by the parser's family name).
VLLM_DOCUMENTED = {
    "gauge": ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"],
    "counter": ["vllm:request_success", "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
                "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:spec_decode_num_drafts",
                "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens",
                "vllm:spec_decode_num_accepted_tokens_per_pos"],
    "histogram": ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                  "vllm:request_time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
                  "vllm:request_queue_time_seconds", "vllm:request_inference_time_seconds",
                  "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                  "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:iteration_tokens_total"],
}


def test_only_vllms_series_are_renamed_and_labelled() -> None:
    registry = new_registry("vllm", "my-model")
    Counter(PREFIX + "prompt_tokens", "x", registry=registry).inc(3)
    Counter(PREFIX + "requests_refused", "ours alone", ["reason"], registry=registry).labels("overloaded").inc()
    text = generate_latest(registry).decode()
    assert 'vllm:prompt_tokens_total{engine="0",model_name="my-model"} 3.0' in text
    assert 'stepserve:requests_refused_total{reason="overloaded"} 1.0' in text  # vLLM has no such series
    assert "stepserve:prompt_tokens" not in text
    assert "stepserve:prompt_tokens_total 3.0" in generate_latest(_default(3)).decode()


def _default(n: int):
    registry = new_registry()
    Counter(PREFIX + "prompt_tokens", "x", registry=registry).inc(n)
    return registry


def test_a_live_step_serves_vllms_names_and_labels(servers) -> None:
    """Step 09 carries every series of the list (step 05's, 07's prefix cache, 09's speculation)."""
    url = servers("step09_speculative", "tiny-llama", "--metrics-namespace", "vllm", *SMALL_POOL,
                  "--served-model-name", "tiny").url
    r = httpx.post(url + "/v1/completions", json={"prompt": "the cat the cat the cat", "max_tokens": 8,
                                                  "temperature": 0}, timeout=60)
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text)}
    for kind, names in VLLM_DOCUMENTED.items():
        for name in names:
            assert name in families, f"{name} missing"
            family = families[name]
            assert family.type == kind, (name, family.type)
            assert family.samples and all(s.labels["model_name"] == "tiny" and s.labels["engine"] == "0"
                                          for s in family.samples), name
    sample = {s.name: s.value for s in families["vllm:prompt_tokens"].samples}
    assert sample["vllm:prompt_tokens_total"] >= 7  # the request's prompt was counted there
    assert {s.labels["finished_reason"] for s in families["vllm:request_success"].samples} >= {"stop", "length"}
    assert not any(name.startswith("stepserve:") and name.removeprefix("stepserve:") in
                   {n.removeprefix("vllm:") for ns in VLLM_DOCUMENTED.values() for n in ns} for name in families)
