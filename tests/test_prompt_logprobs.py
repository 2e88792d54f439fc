"""``echo`` with ``logprobs`` on every step with an engine loop (04 on): the prompt tokens'
log-probabilities equal transformers' on the same weights, in chunks and past a prefix cache;
steps without one refuse ``echo`` with a 400 naming it."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.conftest import EXACT_FLAGS, SMALL_POOL
from tests.helpers import prompt_ids, reference_model

ENGINE_STEPS = ("step04_kvcache", "step07_paged_kv", "step08_quant", "step09_speculative", "step10_kernels",
                "step11_multigpu")
PROMPT = "The capital of France is Paris, and the capital of Spain is"


def flags(step: str, *more: str) -> tuple[str, ...]:
    """Steps 08 to 11 as float32 (exact; 11 with two ranks); steps 07 on with a small pool (memory:
    conftest's release_all)."""
    if step in ("step08_quant", "step09_speculative", "step10_kernels", "step11_multigpu"):
        return (*EXACT_FLAGS[step], *more)
    return (*SMALL_POOL, *more) if step == "step07_paged_kv" else more


def reference_prompt_logprobs(model: str, ids: list[int]) -> list[float]:
    with torch.inference_mode():
        logits = reference_model(model).model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]


def echo(url: str, prompt: str | list[int], **extra: object) -> dict:
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2, **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize("step", ENGINE_STEPS)
def test_prompt_logprobs_equal_transformers_and_the_prompt_is_echoed(servers, step: str) -> None:
    url = servers(step, "tiny-gemma3", *flags(step)).url
    ids = prompt_ids("tiny-gemma3", PROMPT)
    choice = echo(url, PROMPT)
    lp = choice["logprobs"]
    n = len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing precedes BOS
    assert lp["token_logprobs"][1:n] == pytest.approx(reference_prompt_logprobs("tiny-gemma3", ids), abs=1e-4)
    assert len(lp["tokens"]) == n + 3 and choice["text"].startswith(PROMPT) and len(choice["text"]) > len(PROMPT)
    assert all(len(top) >= 2 for top in lp["top_logprobs"][1:n])  # top 2, and the prompt token itself
    assert lp["text_offset"][:n] == sorted(lp["text_offset"][:n])


@pytest.mark.parametrize("step", ["step07_paged_kv", "step08_quant", "step09_speculative", "step10_kernels",
                                  "step11_multigpu"])
def test_prompt_logprobs_are_whole_past_the_prefix_cache_and_across_chunks(servers, step: str) -> None:
    url = servers(step, "tiny-llama", *flags(step, "--block-size", "4", "--max-num-batched-tokens", "16")).url
    prompt = PROMPT * 2  # more tokens than one step's budget: prefilled in chunks
    ids = prompt_ids("tiny-llama", prompt)
    assert len(ids) > 40
    want = reference_prompt_logprobs("tiny-llama", ids)
    plain = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0}, timeout=60).json()
    for _ in range(2):  # the blocks are cached after the first request; echo must not skip them
        got = echo(url, ids)["logprobs"]["token_logprobs"]
        assert got[1:len(ids)] == pytest.approx(want, abs=1e-4)
    again = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0}, timeout=60).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the cache still serves others
    assert plain["choices"][0]["text"] == again["choices"][0]["text"]


def test_a_streamed_echo_sends_the_prompt_first(servers) -> None:
    url = servers("step07_paged_kv", "tiny-gemma3", *SMALL_POOL).url
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 0,
                            "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    first = chunks[0]["choices"][0]
    assert first["text"] == PROMPT and first["logprobs"]["token_logprobs"][0] is None
    assert len(first["logprobs"]["tokens"]) == len(prompt_ids("tiny-gemma3", PROMPT))
    assert "".join(c["choices"][0]["text"] for c in chunks) == echo(url, PROMPT, logprobs=None)["text"]


def test_echo_without_logprobs_returns_the_text_only(servers) -> None:
    url = servers("step04_kvcache", "tiny-llama").url
    choice = echo(url, PROMPT, logprobs=None)
    assert choice["text"].startswith(PROMPT) and choice["logprobs"] is None


@pytest.mark.parametrize("step", ["step00_baseline", "step03_batching"])
def test_steps_without_an_engine_loop_refuse_echo_naming_it(servers, step: str) -> None:
    url = servers(step, "tiny-llama").url
    r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "echo": True, "logprobs": 1}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_prompt_logprobs_out_of_range_is_a_400(servers) -> None:
    url = servers("step04_kvcache", "tiny-llama").url
    r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "echo": True, "logprobs": 21}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
