"""Step 04's scheduler on its own (no model): the policy, the budget, rows, FCFS, abort, limits."""
from __future__ import annotations

import random

import pytest

from shared.sampling import SamplingParams
from step04_kvcache.model_runner import GIB, RunnerConfig, cache_row_len
from step04_kvcache.scheduler import ContiguousScheduler, SchedulerConfig, SchedulerOutput
from step04_kvcache.sequence import Sequence, SequenceStatus

EOS = 1


def seq(rid: str, prompt_len: int, max_tokens: int = 4, ignore_eos: bool = True) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
    return Sequence(rid, tuple(range(10, 10 + prompt_len)), params, 0.0)


def scheduler(max_seqs: int = 4, budget: int = 16, max_len: int = 512) -> ContiguousScheduler:
    return ContiguousScheduler(SchedulerConfig(max_seqs=max_seqs, max_num_batched_tokens=budget), max_len, (EOS,))


def step(s: ContiguousScheduler, token: int = 7) -> SchedulerOutput:
    """schedule() and update() as the engine does, every row sampling ``token``."""
    out = s.schedule()
    s.update(out, [[token]] * len(out.sampling_seqs))
    return out


def chunks(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.seq.request_id, c.start, c.num_tokens) for c in out.prefills]


def test_each_step_decodes_every_running_sequence_then_fills_the_budget_with_prompt_chunks() -> None:
    s = scheduler(budget=10)
    a, b = seq("a", 3, max_tokens=10), seq("b", 20)
    s.add(a)
    s.add(b)
    out = step(s)
    assert out.decodes == () and chunks(out) == [("a", 0, 3), ("b", 0, 7)]
    assert out.sampling_seqs == [a]  # b is mid-prompt: it produces nothing yet
    out = step(s)
    assert out.decodes == (a,) and chunks(out) == [("b", 7, 9)]
    out = step(s)
    assert out.decodes == (a,) and chunks(out) == [("b", 16, 4)] and out.sampling_seqs == [a, b]
    out = step(s)
    assert out.decodes == (a, b) and out.prefills == ()
    assert (a.num_output_tokens, b.num_output_tokens) == (4, 2)


def test_a_long_prompt_never_stalls_running_decodes() -> None:
    s = scheduler(budget=8)
    a = seq("a", 2, max_tokens=100)
    s.add(a)
    step(s)
    s.add(seq("long", 60))
    for _ in range(9):  # 60 prompt tokens at 7 per step: a decodes in every one of those steps
        before = a.num_output_tokens
        out = step(s)
        assert a in out.decodes and a.num_output_tokens == before + 1
        assert out.num_batched_tokens <= 8
    assert [c.num_tokens for c in out.prefills] == [4]  # 8 chunks of 7, then the last 4


def test_waiting_sequences_are_admitted_first_come_first_served_and_all_finish() -> None:
    s = scheduler(max_seqs=2, budget=4)
    seqs = [seq(f"r{i}", 3 + i % 3, max_tokens=2 + i % 4) for i in range(7)]
    for q in seqs:
        s.add(q)
    admitted: list[str] = []
    for _ in range(200):
        if not s.has_work():
            break
        admitted += [c.seq.request_id for c in step(s).prefills if c.start == 0]
    assert admitted == [q.request_id for q in seqs]
    assert all(q.status is SequenceStatus.FINISHED and q.num_output_tokens == q.params.max_tokens for q in seqs)


def test_budget_rows_and_decodes_hold_at_every_step_of_a_random_workload() -> None:
    rng = random.Random(4)
    s = scheduler(max_seqs=4, budget=12)
    pending = [seq(f"r{i}", rng.randint(1, 40), rng.randint(1, 12)) for i in range(30)]
    everyone = list(pending)
    for _ in range(1000):
        for _ in range(rng.randint(0, 2)):  # arrivals at random steps
            if pending:
                s.add(pending.pop(0))
        if rng.random() < 0.05 and s.running:  # an occasional abort
            s.finish(rng.choice(s.running), "abort")
        if not s.has_work() and not pending:
            break
        decoding = [q for q in s.running if not q.is_prefilling]
        out = step(s)
        assert out.num_batched_tokens <= 12
        assert list(out.decodes) == decoding  # every running decode, every step
        assert len(s.running) <= 4 and len(s.running) + len(s.free_rows) == 4
        assert {q.block_table[0] for q in s.running} | set(s.free_rows) == {0, 1, 2, 3}  # no row given twice
    assert all(q.status is SequenceStatus.FINISHED for q in everyone)
    assert all(q.num_output_tokens == q.params.max_tokens for q in everyone if q.finish_reason == "length")


def test_finishing_frees_the_row_for_the_next_waiting_sequence() -> None:
    s = scheduler(max_seqs=1, budget=4)
    a, b = seq("a", 2, max_tokens=2), seq("b", 2)
    s.add(a)
    s.add(b)
    step(s)
    assert a.block_table == [0] and b.status is SequenceStatus.WAITING
    step(s)  # a's second token: finished, row 0 free
    assert a.finish_reason == "length" and a.block_table == [] and s.free_rows == [0]
    out = step(s)
    assert chunks(out) == [("b", 0, 2)] and b.block_table == [0]


def test_abort_frees_a_running_row_and_removes_a_waiting_sequence() -> None:
    s = scheduler(max_seqs=1, budget=4)
    a, b = seq("a", 2, max_tokens=50), seq("b", 2)
    s.add(a)
    s.add(b)
    step(s)
    s.finish(b, "abort")
    assert b not in s.waiting and b.finish_reason == "abort"
    s.finish(a, "abort")
    assert (s.running, s.free_rows, a.status) == ([], [0], SequenceStatus.FINISHED)
    assert s.schedule().is_empty
    with pytest.raises(ValueError, match="already finished"):
        s.finish(a, "abort")


def test_stops_at_eos_unless_ignored() -> None:
    s = scheduler()
    a, b = seq("a", 2, max_tokens=9, ignore_eos=False), seq("b", 2, max_tokens=9, ignore_eos=True)
    s.add(a)
    s.add(b)
    step(s, token=EOS)
    assert a.finish_reason == "stop" and b.status is SequenceStatus.RUNNING


def test_a_sequence_stops_when_its_cache_row_is_full() -> None:
    s = scheduler(max_len=8)
    a = seq("a", 5, max_tokens=100)
    s.add(a)
    while s.has_work():
        step(s)
    assert a.finish_reason == "length" and a.num_tokens == 8


@pytest.mark.parametrize("prompt_len", [0, 8, 9])
def test_rejects_a_prompt_that_does_not_fit_a_row(prompt_len: int) -> None:
    with pytest.raises(ValueError, match="prompt_token_ids"):
        scheduler(max_len=8).add(seq("a", prompt_len))


def test_rejects_a_budget_smaller_than_the_number_of_rows() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="max_seqs"):
        SchedulerConfig(max_seqs=0)
    with pytest.raises(ValueError, match="kv_cache_gib"):
        RunnerConfig(kv_cache_gib=0)


def test_cache_rows_hold_the_model_context_or_what_fits() -> None:
    assert cache_row_len(512, False, 4, 1024, 1.0) == 512
    fits = GIB // (16 * 36864)
    assert cache_row_len(32768, False, 16, 36864, 1.0) == fits < 32768  # the model's own limit is cut
    with pytest.raises(ValueError, match="max_model_len"):  # an explicit --max-model-len is not
        cache_row_len(32768, True, 16, 36864, 1.0)
