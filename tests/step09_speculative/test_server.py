"""Step 09's server: bad speculative flags are usage errors naming the flag; a draft the model
cannot make is a clear load failure on /health; /health and /metrics count drafts and acceptances."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMALL_POOL, Server
from tests.helpers import usage_error


@pytest.mark.parametrize("flags,named", [
    (["--speculative-method", "medusa"], "--speculative-method"),
    (["--num-speculative-tokens", "17"], "--num-speculative-tokens"),
    (["--prompt-lookup-min", "3", "--prompt-lookup-max", "2"], "--prompt-lookup-max"),
    (["--prompt-lookup-min", "0"], "--prompt-lookup-min"),
    (["--speculative-draft", "eagle"], "--speculative-draft"),
    (["--speculative-max-verify-tokens", "-1"], "--speculative-max-verify-tokens"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(flags: list[str], named: str) -> None:
    assert named in usage_error("step09_speculative", *flags)


def test_a_draft_deeper_than_the_model_fails_the_load_naming_the_flag(tmp_path: Path) -> None:
    """tiny-llama has 2 layers: an early-exit draft of 9 cannot be made; the server says so."""
    s = Server("step09_speculative", "tiny-llama", ("--speculative-method", "draft", "--speculative-draft",
                                                    "early-exit", "--speculative-draft-layers", "9", *SMALL_POOL), tmp_path)
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and (health is None or health.json().get("status") != "failed"):
            time.sleep(0.2)
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(s.url + "/health", timeout=2)
        assert health is not None and health.status_code == 503
        assert "--speculative-draft-layers" in health.json()["error"]
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503
    finally:
        s.stop()


def test_health_and_metrics_count_drafts_and_acceptances(servers) -> None:
    url = servers("step09_speculative", "tiny-gemma3", "--speculative-max-verify-tokens", "0", *SMALL_POOL).url
    body = {"prompt": "one two three one two three one two", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    health = httpx.get(url + "/health").json()
    s = health["scheduler"]
    assert health["model"]["speculative_method"] == "ngram" and health["model"]["num_speculative_tokens"] == "7"
    assert s["spec_decode_num_draft_tokens"] > 0 and s["spec_decode_num_accepted_tokens"] > 0
    metrics = httpx.get(url + "/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("stepserve:spec_decode_num_accepted_tokens_total "))
    assert float(line.split()[-1]) == s["spec_decode_num_accepted_tokens"]
    assert "stepserve:spec_decode_acceptance_rate" in metrics and 'position="0"' in metrics
