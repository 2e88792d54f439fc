"""Reference generations (transformers' ``generate``, float32, batch 1) and the comparison rules.

Guide §3: on the tiny models every step must match the reference token for token; on the real
model, by vLLM's ``check_logprobs_close`` rule: walk both sequences, and at the first mismatch each
side's token must be among the other side's top-5 log-probabilities; then stop comparing.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from typing import Any

import httpx
import pytest
import torch

from shared.config import ModelConfig
from shared.models import LoadedModel, load_model

PROMPTS = (
    "The capital of France is",
    "Q: What is the capital of France?\nA:",
    "def fibonacci(n):",
    "Once upon a time, in a land far, far away, there lived a",
    "Él dijo: «¿Dónde está la biblioteca?» — 図書館はどこですか",  # multi-byte characters
)


@functools.lru_cache(maxsize=4)
def reference_model(model: str) -> LoadedModel:
    return load_model(ModelConfig(model=model))


def prompt_ids(model: str, prompt: str) -> list[int]:
    return reference_model(model).tokenizer(prompt).input_ids


def reference_greedy(model: str, ids: list[int], max_tokens: int, stop_at_eos: bool) -> tuple[list[int], list[list[int]]]:
    """Greedy tokens from transformers' ``generate`` and each step's top-5 token ids."""
    from transformers import GenerationConfig

    lm = reference_model(model)
    eos = list(lm.eos_token_ids) if stop_at_eos else []  # [] (not None) really disables EOS
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=0,
                           output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([ids]), generation_config=cfg)
    tokens = out.sequences[0, len(ids):].tolist()
    top5 = [s[0].topk(5).indices.tolist() for s in out.scores]
    return tokens, top5


def server_greedy(url: str, ids: list[int], max_tokens: int, stop_at_eos: bool) -> tuple[list[int], list[list[int]], str]:
    """Greedy tokens from a server, with top-5 ids per step, via exact token ids in logprobs."""
    body: dict[str, Any] = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "logprobs": 5,
                            "ignore_eos": not stop_at_eos, "return_tokens_as_token_ids": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    as_id = lambda s: int(s.removeprefix("token_id:"))  # noqa: E731
    tokens = [as_id(t) for t in lp["tokens"]]
    top5 = [[as_id(t) for t in top] for top in lp["top_logprobs"]]
    return tokens, top5, choice["finish_reason"]


def check_logprobs_close(ref: tuple[list[int], list[list[int]]], test: tuple[list[int], list[list[int]]]) -> None:
    """vLLM's rule: identical up to the first mismatch, where each token is in the other's top-5."""
    (ref_ids, ref_top), (test_ids, test_top) = ref, test
    for i, (a, b) in enumerate(zip(ref_ids, test_ids)):
        if a != b:
            assert a in test_top[i] and b in ref_top[i], \
                f"position {i}: reference {a} (top5 {ref_top[i]}) vs served {b} (top5 {test_top[i]})"
            return
    assert len(ref_ids) == len(test_ids), f"lengths differ: {len(ref_ids)} vs {len(test_ids)}"


def usage_error(step: str, *flags: str, env: dict[str, str] | None = None) -> str:
    """Start ``python -m step`` with ``flags`` on tiny-llama; assert it exits as a usage error (2)
    before loading anything, and return its last stderr line (the one that must name the flag)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", step, "--model", "tiny-llama", *flags], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 2, r.stderr[-500:]
    return r.stderr.splitlines()[-1]


def apt_binary(binary: str, package: str, timeout_s: float = 900.0) -> str:
    """The path of ``binary``, installing Debian's ``package`` with apt-get where it is missing and this
    user may (root); skips the test, saying why, where it cannot."""
    if found := shutil.which(binary):
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{binary} is not installed, and installing it needs root and apt-get "
                    f"(Debian: apt-get install {package})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    for cmd in (install, ["apt-get", "update"], install):  # the package lists may be missing or stale
        try:
            subprocess.run(cmd, env=env, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            break
        if found := shutil.which(binary):
            return found
    pytest.skip(f"{binary} is not installed and `apt-get install {package}` failed here")

