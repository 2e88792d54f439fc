"""Every step's greedy output equals transformers' ``generate``, token for token (guide §3)."""
from __future__ import annotations

import pytest

from tests.conftest import EXACT_FLAGS, STEPS
from tests.helpers import PROMPTS, check_logprobs_close, prompt_ids, reference_greedy, server_greedy

TINY = ("tiny-llama", "tiny-gemma3")


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("step", STEPS)
def test_greedy_matches_transformers_token_for_token(servers, step: str, model: str) -> None:
    url = servers(step, model, *EXACT_FLAGS.get(step, ())).url
    for prompt in PROMPTS:
        ids = prompt_ids(model, prompt)
        ref, _ = reference_greedy(model, ids, 40, stop_at_eos=False)  # 40 tokens: well past the window of 16
        got, _, finish = server_greedy(url, ids, 40, stop_at_eos=False)
        assert got == ref, f"{step}/{model} differs on {prompt!r}"
        assert finish == "length"


@pytest.mark.parametrize("step", STEPS)
def test_stops_at_eos_where_transformers_does(servers, step: str) -> None:
    """tiny-llama emits <eos> early on some prompts: the server must stop exactly there."""
    url = servers(step, "tiny-llama", *EXACT_FLAGS.get(step, ())).url
    stopped = 0
    for prompt in PROMPTS + tuple(f"prompt number {i}" for i in range(12)):
        ids = prompt_ids("tiny-llama", prompt)
        ref, _ = reference_greedy("tiny-llama", ids, 60, stop_at_eos=True)
        got, _, finish = server_greedy(url, ids, 60, stop_at_eos=True)
        assert got == ref, f"{step} differs on {prompt!r}"
        assert finish == ("stop" if len(ref) < 60 else "length")
        stopped += len(ref) < 60
    assert stopped > 0, "no prompt reached <eos>: this test would not notice EOS handling breaking"


@pytest.mark.real_model
@pytest.mark.parametrize("step", STEPS)
def test_real_model_follows_the_logprob_rule(servers, step: str) -> None:
    servers.release_all()  # room for one real-model server (see release_all)
    url = servers(step, "gemma-3-270m", *EXACT_FLAGS.get(step, ())).url
    try:
        for prompt in PROMPTS[:3]:
            ids = prompt_ids("gemma-3-270m", prompt)
            ref = reference_greedy("gemma-3-270m", ids, 16, stop_at_eos=False)
            got, top, _ = server_greedy(url, ids, 16, stop_at_eos=False)
            check_logprobs_close(ref, (got, top))
    finally:
        servers.release(step, "gemma-3-270m", *EXACT_FLAGS.get(step, ()))  # one real-model server at a time: memory
