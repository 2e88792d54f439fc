"""The bench's speculation counters: vLLM's names under any prefix, differenced per load point."""
from __future__ import annotations

import httpx
import pytest

from engines_compare import speculation

METRICS = """# HELP llamacpp:spec_decode_num_draft_tokens_total Speculative: Total draft tokens generated
llamacpp:spec_decode_num_draft_tokens_total 120
llamacpp:spec_decode_num_accepted_tokens_total 90
llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 40
stepserve:spec_decode_num_drafts_total 30
other_total 5
"""


def test_reads_the_three_counters_under_any_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpx, "get", lambda url, timeout: httpx.Response(200, text=METRICS))
    assert speculation.counters("http://x") == {"num_draft_tokens": 120.0, "num_accepted_tokens": 90.0,
                                                "num_drafts": 30.0}


def test_a_point_gives_acceptance_rate_and_mean_length() -> None:
    before = {"num_drafts": 10.0, "num_draft_tokens": 70.0, "num_accepted_tokens": 35.0}
    after = {"num_drafts": 30.0, "num_draft_tokens": 210.0, "num_accepted_tokens": 105.0}
    d = speculation.delta(before, after)
    assert (d["num_drafts"], d["num_draft_tokens"], d["num_accepted_tokens"]) == (20, 140, 70)
    assert d["acceptance_rate"] == 0.5 and d["mean_acceptance_length"] == 4.5
    no_drafts = speculation.delta({"num_draft_tokens": 5.0, "num_accepted_tokens": 1.0},
                                  {"num_draft_tokens": 9.0, "num_accepted_tokens": 3.0})
    assert no_drafts["acceptance_rate"] == 0.5 and no_drafts["mean_acceptance_length"] is None  # llama.cpp's


def test_a_server_without_counters_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpx, "get", lambda url, timeout: httpx.Response(200, text="other_total 5\n"))
    assert speculation.counters("http://x") is None and speculation.delta(None, None) is None
