"""The backlog's rules and the engine's deadline rule, without a server."""
from __future__ import annotations

import asyncio
import functools
import time

import pytest
import torch

from shared.config import ModelConfig, build_parser, from_args
from shared.engine import GenerationRequest
from shared.errors import RequestError
from shared.models import load_model
from shared.sampling import SamplingParams
from step04_kvcache.engine import AsyncEngine
from step04_kvcache.engine_core import DONE, EngineCore, Entry
from step04_kvcache.model_runner import RunnerConfig, build_contiguous_runner
from step04_kvcache.scheduler import ContiguousScheduler, SchedulerConfig
from step06_backpressure import admission
from step06_backpressure.admission import AdmissionConfig, Backlog
from step06_backpressure.app import LimitsConfig
from step06_backpressure.deadlines import DeadlineExceeded, Deadlines
from step06_backpressure.gate import GateConfig


def req(rid: str, n_tokens: int = 10, timeout: float | None = None, max_tokens: int = 50,
        arrival: float | None = None) -> GenerationRequest:
    return GenerationRequest(rid, tuple(range(2, 2 + n_tokens)), SamplingParams(max_tokens=max_tokens, temperature=0),
                             time.monotonic() if arrival is None else arrival, timeout)


def test_in_flight_is_bounded_by_rows_plus_waiting_and_beyond_is_a_429() -> None:
    b = Backlog(AdmissionConfig(max_waiting_requests=1, retry_after=7), max_running=2)
    b.admit([req("a"), req("b")])  # the two rows
    b.admit([req("c")])  # the one that may wait for a row
    with pytest.raises(RequestError) as e:
        b.admit([req("d")])
    assert (e.value.status, e.value.code, e.value.type) == (429, "server_overloaded", "rate_limit_error")
    assert e.value.headers == {"Retry-After": "7"}
    assert b.overloaded() and (b.num_in_flight, b.refused) == (3, 1)


def test_waiting_prompt_tokens_are_bounded_until_the_first_token() -> None:
    assert Backlog(AdmissionConfig(), max_running=8, step_tokens=77).max_waiting_tokens == (8 + 256) * 77  # the default
    b = Backlog(AdmissionConfig(max_waiting_prompt_tokens=25), max_running=8, step_tokens=77)
    a = req("a")
    b.admit([a, req("b")])
    with pytest.raises(RequestError):  # 20 + 10 tokens > 25
        b.admit([req("c")])
    b.admit([req("d", 5)])  # 25: fits exactly
    b.claim(a)
    b.first_token(a)
    b.first_token(a)  # idempotent
    assert (b.num_in_flight, b.num_waiting_tokens) == (3, 15)
    b.admit([req("e")])


def test_a_request_with_several_choices_is_admitted_or_refused_whole() -> None:
    b = Backlog(AdmissionConfig(max_waiting_requests=0), max_running=3)
    b.admit([req("x")])
    with pytest.raises(RequestError):
        b.admit([req("y-0"), req("y-1"), req("y-2")])
    assert b.num_in_flight == 1


def test_an_empty_server_admits_even_a_request_beyond_the_bounds() -> None:
    b = Backlog(AdmissionConfig(max_waiting_requests=0, max_waiting_prompt_tokens=5), max_running=1)
    b.admit([req("big", 100), req("big2", 100)])
    assert b.num_waiting_tokens == 200
    with pytest.raises(RequestError):
        b.admit([req("small", 1)])


def test_finishing_frees_room_and_is_idempotent() -> None:
    b = Backlog(AdmissionConfig(max_waiting_requests=0), max_running=1)
    a = req("a")
    b.admit([a])
    assert b.claim(a) and not b.claim(req("a"))  # another object with the same id was never admitted
    b.finish(a)
    b.finish(a)
    assert (b.num_in_flight, b.num_waiting_tokens) == (0, 0)
    b.admit([req("b")])


def test_unclaimed_reservations_are_released_and_claimed_ones_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    b = Backlog(AdmissionConfig(), max_running=4)
    claimed, unclaimed, stale = req("c"), req("u"), req("s")
    b.admit([claimed, unclaimed])
    b.claim(claimed)
    b.release_unclaimed([claimed, unclaimed])
    assert b.num_in_flight == 1  # the claimed one goes on in the engine
    b.admit([stale])
    monkeypatch.setattr(admission, "STALE_S", -1.0)  # every unclaimed reservation is now stale
    b.admit([req("new")])
    assert b.num_in_flight == 2 and not b.claim(stale)


def test_step06_settings_are_flags_and_checked() -> None:
    ns = build_parser("step06", "", AdmissionConfig, LimitsConfig, GateConfig).parse_args(
        ["--max-queue-delay", "0.5", "--max-waiting-requests", "4", "--max-waiting-prompt-tokens", "99",
         "--request-timeout", "2.5",
         "--max-prompt-tokens", "64", "--max-output-tokens", "8", "--max-body-bytes", "100",
         "--max-buffered-chunks", "3", "--drain-timeout", "1"])
    assert from_args(AdmissionConfig, ns) == AdmissionConfig(0.5, 4, 99, 1, 2.5)
    assert from_args(LimitsConfig, ns) == LimitsConfig(64, 8)
    assert from_args(GateConfig, ns) == GateConfig(100, 3, 1.0)
    for bad in (lambda: AdmissionConfig(max_waiting_requests=-1), lambda: AdmissionConfig(request_timeout=-1),
                lambda: AdmissionConfig(max_waiting_prompt_tokens=-1), lambda: AdmissionConfig(max_queue_delay=-0.1),
                lambda: AdmissionConfig(max_queue_delay=float("nan")),
                lambda: GateConfig(max_buffered_chunks=0), lambda: LimitsConfig(max_prompt_tokens=-1)):
        with pytest.raises(ValueError):
            bad()


@functools.lru_cache(maxsize=1)
def _tiny() -> object:
    return load_model(ModelConfig(model="tiny-llama"))


def _core_with(requests: list[GenerationRequest], deadlines: Deadlines) -> tuple[EngineCore, list[Entry]]:
    """Step 06's engine core (step 04's parts, the deadline policy) on tiny-llama, driven by hand:
    no thread, no event loop."""
    sched = SchedulerConfig(max_seqs=2, max_num_batched_tokens=16)
    runner = build_contiguous_runner(_tiny(), sched, RunnerConfig(0.01), explicit_len=False)
    core = EngineCore(ContiguousScheduler(sched, runner.max_len, ()), runner, policies=[deadlines])
    entries = [Entry(r, asyncio.Queue()) for r in requests]
    for e in entries:
        assert core.add(e) == []
    return core, entries


def test_deadline_before_the_first_token_fails_the_request_and_frees_its_row() -> None:
    late = req("late", timeout=1.0, arrival=time.monotonic() - 2.0)
    deadlines = Deadlines()
    core, _ = _core_with([late], deadlines)
    seq = core.scheduler.waiting[0]
    assert deadlines.before_step([(seq, late)], late.arrival_time + 0.5) == []  # within its timeout
    core.scheduler.schedule()  # it takes a row and starts its prefill
    assert core.scheduler.num_used_rows == 1
    items = [item for _, item in core.step()]  # the policy runs first: the step has nothing left to do
    assert isinstance(items[0], DeadlineExceeded) and items[0].status == 504 and items[1] is DONE
    assert core.scheduler.num_used_rows == 0 and not core.has_work()
    assert deadlines.stats().num_deadlines_exceeded == 1


def test_deadline_while_generating_makes_the_next_token_the_last_with_length() -> None:
    own, default = req("own", 5, timeout=1.0), req("default", 5)
    deadlines = Deadlines(default_timeout=1.5)
    core, _ = _core_with([own, default], deadlines)
    with torch.inference_mode():
        first = core.step()  # both prefill and sample their first token, well within their deadlines
        assert [type(item).__name__ for _, item in first] == ["TokenEvent", "TokenEvent"]
        pairs = list(zip(core.scheduler.running, (own, default)))
        assert deadlines.before_step(pairs, time.monotonic() + 2.0) == []  # 2 s later: past both
        assert [s.params.max_tokens for s, _ in pairs] == [2, 2]  # the next token is their last
        second = core.step()
    assert [item.finish_reason for _, item in second if item is not DONE] == ["length", "length"]
    assert [item for _, item in second][-2:] == [DONE, DONE] and not core.has_work()
    assert deadlines.stats().num_deadlines_exceeded == 2


def test_no_deadline_without_a_timeout() -> None:
    r = req("free", max_tokens=50, arrival=time.monotonic() - 1e6)
    core, _ = _core_with([r], Deadlines())
    seq = core.scheduler.waiting[0]
    assert Deadlines().before_step([(seq, r)], time.monotonic()) == []
    assert seq.params.max_tokens == 50 and Deadlines().timeout_of(r) is None
    assert Deadlines(default_timeout=3.0).timeout_of(r) == 3.0 and Deadlines(3.0).timeout_of(req("x", timeout=1.0)) == 1.0


def test_engine_generate_refuses_when_its_backlog_is_full() -> None:
    backlog = Backlog(AdmissionConfig(max_waiting_requests=0), max_running=1)
    engine = AsyncEngine(ModelConfig(model="tiny-llama"), build_core=_never, request_policies=[backlog])
    backlog.admit([req("running")])

    async def first() -> None:
        async for _ in engine.generate(req("refused")):
            pass

    with pytest.raises(RequestError, match="overloaded"):
        asyncio.run(first())
    assert backlog.num_in_flight == 1 and backlog.stats().num_refused == 1


def _never(lm: object) -> EngineCore:
    raise AssertionError("the engine is not started in this test")
