"""Step 07 over HTTP: cached prompt tokens in usage (vLLM/OpenAI's ``prompt_tokens_details``),
KV usage in blocks, preemptions and prefix-cache counters on /health, exact under a tiny pool."""
from __future__ import annotations

import concurrent.futures
import json

import httpx

from tests.conftest import SMALL_POOL
from tests.helpers import prompt_ids, reference_greedy, server_greedy

STEP = "step07_paged_kv"
TINY_POOL = ("--block-size", "4", "--num-kv-blocks", "24", "--max-seqs", "4", "--max-num-batched-tokens", "16",
             "--max-waiting-requests", "8", "--max-waiting-prompt-tokens", "4096")  # step 06 admits all 6 at once


def test_a_repeated_prompt_reports_its_cached_tokens_in_usage(servers) -> None:
    url = servers(STEP, "tiny-llama", *SMALL_POOL).url  # the server the conformance suite uses
    prompt = "A long shared system prompt, the same for every request: " * 2
    n = len(prompt_ids("tiny-llama", prompt))
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
    first = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    second = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"] == n
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 16 * 16}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 16 * 16}
    health = httpx.get(url + "/health").json()["scheduler"]
    assert health["prefix_cache_hits"] >= 2 * ((n - 1) // 16 * 16) and health["kv_block_size"] == 16
    assert health["kv_blocks_used"] == 0 and health["kv_blocks_total"] > 0


def test_concurrent_requests_through_a_tiny_pool_are_preempted_and_exact(servers) -> None:
    # the whole burst must be admitted: a generous --max-queue-delay (at step 06's 0.1 s default the
    # predicted wait refuses part of a simultaneous burst, by design)
    url = servers(STEP, "tiny-gemma3", *TINY_POOL, "--max-queue-delay", "60").url
    prompts = [prompt_ids("tiny-gemma3", f"request number {i}: tell me more about the sea") for i in range(6)]

    def one(ids: list[int]) -> tuple[list[int], list[int]]:
        return server_greedy(url, ids, 40, stop_at_eos=False)[0], reference_greedy("tiny-gemma3", ids, 40, False)[0]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, prompts))
    assert all(got == ref for got, ref in results)
    health = httpx.get(url + "/health").json()["scheduler"]
    assert health["num_preemptions"] > 0 and health["kv_blocks_total"] == 24 and health["kv_blocks_used"] == 0
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in httpx.get(url + "/metrics").text.splitlines()
               if line and not line.startswith("#")}
    assert metrics["stepserve:num_preemptions_total"] == health["num_preemptions"]
    assert metrics["stepserve:kv_cache_blocks_total"] == 24
    assert metrics["stepserve:prefix_cache_queries_total"] == health["prefix_cache_queries"] > 0
