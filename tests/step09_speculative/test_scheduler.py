"""The speculative scheduler: room for the drafts before the step, the rejected drafts' blocks
given back after it (block-table truncation), lookahead capped by max_tokens and the batch rule."""
from __future__ import annotations

import time

import pytest

from shared.engine import GenerationRequest
from shared.sampling import SamplingParams
from step04_kvcache.scheduler import SchedulerConfig
from step07_paged_kv.block_manager import BlockManager
from step09_speculative.config import SpeculativeConfig
from step09_speculative.scheduler import SpecScheduler


def scheduler(limit: int = 0, k: int = 4) -> SpecScheduler:
    spec = SpeculativeConfig(speculative_method="ngram", num_speculative_tokens=k, speculative_max_verify_tokens=limit)
    return SpecScheduler(SchedulerConfig(max_seqs=4, max_num_batched_tokens=32), 64, (1,), BlockManager(16, 4), spec)


def add(s: SpecScheduler, rid: str = "r", prompt_len: int = 6, max_tokens: int = 20):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    seq = s.new_sequence(GenerationRequest(rid, tuple(range(10, 10 + prompt_len)), params, time.monotonic()), "cpu")
    s.add(seq)
    return seq


def test_room_for_the_drafts_then_the_rejected_ones_blocks_go_back() -> None:
    s = scheduler()
    seq = add(s)
    s.update(s.schedule(), [[7]])  # the prefill: 6 cached, 2 blocks of 4
    out = s.schedule()
    assert out.decodes == (seq,) and seq.num_lookahead_tokens == 4
    assert len(seq.block_table) == 3  # positions 6..10: the last token and 4 drafts
    seq.spec_token_ids = [8, 9, 10, 11]
    s.update(out, [[8, 5]])  # one draft accepted, then the target's own token
    assert seq.num_computed_tokens == 8 and seq.output_token_ids == [7, 8, 5]
    assert len(seq.block_table) == 2  # truncated to the 8 cached positions
    assert s.block_manager.num_used_blocks == 2
    st = s.stats()
    assert (st.spec_decode_num_drafts, st.spec_decode_num_draft_tokens, st.spec_decode_num_accepted_tokens) == (1, 4, 1)
    assert st.spec_decode_num_accepted_tokens_per_pos == (1, 0, 0, 0) and st.spec_decode_mean_acceptance_length == 2.0


def test_lookahead_stops_at_max_tokens() -> None:
    s = scheduler()
    seq = add(s, max_tokens=3)
    s.update(s.schedule(), [[7]])
    s.schedule()
    assert seq.num_lookahead_tokens == 1  # 2 tokens left: one draft and the target's token


@pytest.mark.parametrize("limit, expected", [(0, 4), (16, 4), (8, 3), (4, 1), (3, 0)])
def test_two_decodes_share_the_verify_tokens(limit: int, expected: int) -> None:
    """k = min(4, limit // 2 - 1) each (0: no limit): fewer drafts, then none, as the batch grows."""
    s = scheduler(limit=limit)
    a, b = add(s, "a"), add(s, "b")
    s.update(s.schedule(), [[7], [7]])
    s.schedule()
    assert a.num_lookahead_tokens == b.num_lookahead_tokens == expected


def test_k_defaults_by_method_and_an_explicit_k_wins() -> None:
    assert [SpeculativeConfig(speculative_method=m).k for m in ("ngram", "draft", "none")] == [7, 1, 0]
    assert SpeculativeConfig(speculative_method="draft", num_speculative_tokens=3).k == 3
