"""Admission by predicted wait: the predictor on synthetic rates and queues, the step-cost fit, and
step 06's real engine core (tiny-llama, step 04's scheduler) driven on a virtual clock where every
step takes exactly ``STEP`` seconds: deterministic, so bounds are checked to the step."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import pytest

from shared.config import ModelConfig
from shared.engine import GenerationRequest, TokenEvent
from shared.errors import RequestError
from shared.models import load_model
from shared.sampling import SamplingParams
from step04_kvcache.engine_core import DONE, EngineCore, Entry
from step04_kvcache.model_runner import RunnerConfig, build_contiguous_runner
from step04_kvcache.observer import StepStats
from step04_kvcache.scheduler import ContiguousScheduler, SchedulerConfig
from step06_backpressure.admission import AdmissionConfig, Backlog
from step06_backpressure.predicted_wait import Prediction, Work, predict
from step06_backpressure.step_cost import StepCost, StepCostModel, calibrate

STEP = 0.05  # the fake model's step time (virtual seconds)


def cost(base: float, per_decode: float = 0.0, per_token: float = 0.0) -> StepCost:
    return StepCost(base, per_decode, per_token, 10)


def test_an_idle_server_predicts_no_wait_and_one_step_to_the_first_token() -> None:
    p = predict(cost(0.1, 0.01, 0.001), max_seqs=4, step_tokens=64, tokens_left=[], waiting=[], new=[Work(10, 5)])
    assert p.wait_s == 0 and p.row_wait_s == 0
    assert p.ttft_s == pytest.approx(0.1 + 10 * 0.001)  # one step (no decode beside it) and its tokens


def test_with_every_row_busy_the_wait_is_until_the_earliest_row_frees() -> None:
    c = cost(0.1, 0.01)
    p = predict(c, 4, 64, tokens_left=[9, 3, 7, 5], waiting=[], new=[Work(10, 5)])
    assert p.row_wait_s == p.wait_s == pytest.approx(3 * c.step_s(4))  # 3 decode steps at 4 rows
    # a second request behind it takes the next row to free: after 5 steps
    p2 = predict(c, 4, 64, tokens_left=[9, 3, 7, 5], waiting=[Work(10, 5)], new=[Work(10, 5)])
    assert p2.wait_s == pytest.approx(5 * c.step_s(4))
    # several choices of one request: the last one's wait counts
    p3 = predict(c, 4, 64, tokens_left=[9, 3, 7, 5], waiting=[], new=[Work(10, 5), Work(10, 5)])
    assert p3.wait_s == pytest.approx(p2.wait_s)


def test_a_busy_engine_counts_the_rest_of_the_step_running_now_and_its_real_pace() -> None:
    c = StepCost(0.1, 0.0, 0.0, 10, recent_step_s=0.2, last_step_end=10.0)  # steps take 0.2 s with prefills in
    p = predict(c, 2, 64, tokens_left=[3, 5], waiting=[], new=[Work(8, 4)], now=10.05)
    assert p.wait_s == pytest.approx(0.15 + 3 * 0.2)  # 0.15 s left of this step, then 3 steps at the pace seen
    idle = predict(c, 2, 64, tokens_left=[], waiting=[], new=[Work(8, 4)], now=10.05)
    assert idle.wait_s == 0  # nothing runs: the next step starts now


def test_prompts_ahead_delay_the_prefill_by_their_share_of_steps() -> None:
    c = cost(0.1, 0.0, 0.001)
    p = predict(c, 8, 64, tokens_left=[], waiting=[Work(128, 4)], new=[Work(16, 4)])
    assert p.row_wait_s == 0
    assert p.wait_s == pytest.approx(128 / 64 * 0.1 + 128 * 0.001)  # two steps' worth of prompt ahead
    assert p.ttft_s > p.wait_s


def test_retry_after_is_the_excess_over_the_bound_in_whole_seconds_at_least_one() -> None:
    p = Prediction(wait_s=3.2, ttft_s=3.5, row_wait_s=3.2)
    assert p.retry_after(1.0) == 3 and p.retry_after(3.1) == 1 and p.retry_after(10.0) == 1
    assert p.retry_after(1.0, of_ttft=True) == 3 and p.retry_after(0.4, of_ttft=True) == 4


def _stats(decodes: int, tokens: int, step_s: float) -> StepStats:
    return StepStats(0.0, decodes, 1 if tokens else 0, tokens, decodes, decodes, 0, 0, 1, 0, 0, 0, 0, step_s)


def test_the_step_cost_fit_recovers_a_linear_cost_and_keeps_the_prior_where_steps_say_nothing() -> None:
    truth = cost(0.02, 0.003, 0.0004)
    m = StepCostModel(max_seqs=16, step_tokens=256)
    for d, t in [(0, 256), (1, 0), (16, 0), (0, 128), (4, 100), (8, 0)] * 3:
        m.on_step(_stats(d, t, truth.step_s(d, t)))
    assert m.cost is not None
    for got, want in zip(dataclasses.astuple(m.cost)[:3], dataclasses.astuple(truth)[:3]):
        assert got == pytest.approx(want, rel=1e-3)
    m.keep_as_prior()
    for _ in range(500):  # a long decode-only stretch on a machine now twice as slow per row
        m.on_step(_stats(16, 0, 0.02 + 0.006 * 16))
    assert m.cost.step_s(16) == pytest.approx(0.02 + 0.006 * 16, rel=0.02)  # follows what it sees
    assert m.cost.per_prefill_token_s == pytest.approx(0.0004, rel=0.25)  # and keeps what it cannot see


class FixedStep:
    """The fake model's clock: every step takes ``STEP`` seconds of ``clock`` (a one-item list)."""

    def __init__(self, model: StepCostModel, clock: list[float]) -> None:
        self.model, self.clock = model, clock

    def on_step(self, stats: StepStats) -> None:  # called inside the step: it ends STEP after it began
        self.model.on_step(dataclasses.replace(stats, step_s=STEP, time=self.clock[0] + STEP))

    def on_request_finished(self, stats: Any) -> None:
        pass


@functools.lru_cache(maxsize=1)
def _tiny() -> Any:
    return load_model(ModelConfig(model="tiny-llama"))


def _req(i: int, prompt: int = 16, max_tokens: int = 8, timeout: float | None = None) -> GenerationRequest:
    return GenerationRequest(f"r{i}", tuple(range(3, 3 + prompt)), SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                                ignore_eos=True), 0.0, timeout)


@dataclasses.dataclass
class Run:
    ttft: dict[str, float]  # admitted: virtual time from arrival to first token
    refused: list[tuple[float, GenerationRequest, RequestError]]  # (arrival, request, the 429)
    backlog: Backlog
    core: EngineCore
    now: list[float]  # the virtual clock

    @property
    def clock(self) -> float:
        return self.now[0]


def simulate(arrivals: list[tuple[float, GenerationRequest]], config: AdmissionConfig,
             sched: SchedulerConfig = SchedulerConfig(max_seqs=4, max_num_batched_tokens=64)) -> Run:
    """Step 06's core and backlog on a virtual clock: arrivals at step boundaries, each step ``STEP``."""
    lm = _tiny()
    runner = build_contiguous_runner(lm, sched, RunnerConfig(0.01), explicit_len=False)
    model, now = StepCostModel(sched.max_seqs, sched.max_num_batched_tokens), [-100.0]  # calibrated long before
    calibrate(EngineCore(ContiguousScheduler(sched, runner.max_len, ()), runner, observers=[FixedStep(model, now)]),
              model, sched.max_seqs, sched.max_num_batched_tokens, lm.model.config.vocab_size)
    now[0] = 0.0
    core = EngineCore(ContiguousScheduler(sched, runner.max_len, ()), runner, observers=[FixedStep(model, now)])
    backlog = Backlog(config, sched.max_seqs, sched.max_num_batched_tokens, model, clock=lambda: now[0])
    run = Run({}, [], backlog, core, now)
    pending, arrived = sorted(arrivals, key=lambda a: a[0]), {}
    while pending or core.has_work():
        while pending and pending[0][0] <= run.clock + 1e-9:
            t, r = pending.pop(0)
            try:
                run.backlog.admit([r])
            except RequestError as e:
                run.refused.append((t, r, e))
                continue
            run.backlog.claim(r)
            arrived[r.request_id] = t
            assert core.add(Entry(r, None)) == []  # type: ignore[arg-type]
        if not core.has_work():
            if pending:
                now[0] = pending[0][0]
            continue
        outputs = core.step()
        now[0] += STEP
        for entry, item in outputs:
            r = entry.request
            if isinstance(item, TokenEvent):
                run.ttft.setdefault(r.request_id, run.clock - arrived[r.request_id])
                run.backlog.on_token(r)
            elif item is DONE:
                run.backlog.on_finish(r)
    return run


def test_a_burst_beyond_capacity_is_partly_refused_and_every_admitted_request_starts_within_the_bound() -> None:
    bound = 0.5  # 10 steps; a request holds a row for 8 (1 prefill + 7 decodes)
    burst = [(0.0, _req(i)) for i in range(40)]
    trickle = [(0.5 + 0.03 * i, _req(100 + i)) for i in range(100)]  # then ~33 requests/s: far beyond 4 rows / 0.4 s
    run = simulate(burst + trickle, AdmissionConfig(max_queue_delay=bound))
    admitted, refused = len(run.ttft), len(run.refused)
    assert admitted + refused == 140 and refused > 0 and admitted > 4 + 4  # more than the rows, far from all
    # Tolerance: one step for an arrival during a step, one step for its own prefill (16 tokens: one step).
    worst = max(run.ttft.values())
    assert worst <= bound + 2 * STEP + 1e-9, sorted(run.ttft.values())[-5:]
    for _, _, e in run.refused:
        assert (e.status, e.code, e.param) == (429, "server_overloaded", None)
        assert int(e.headers["Retry-After"]) >= 1 and "predicted wait" in e.message
    assert run.backlog.refused_by_reason == {"queue_delay": refused, "timeout": 0, "in_flight": 0, "prompt_tokens": 0}


def test_an_idle_server_admits_a_burst_it_can_serve_within_the_bound() -> None:
    """The old rule's opposite error: 33 short requests at an idle server. 4 rows of 8 steps each: the
    last starts in the 9th wave, after 3.2 s; within a 3.5 s bound all are admitted (the old rule's
    in-flight bound, 4 rows + 4 waiting, refused 25), within 3.0 s the last is refused."""
    run = simulate([(0.0, _req(i)) for i in range(33)], AdmissionConfig(max_queue_delay=3.5))
    assert len(run.ttft) == 33 and not run.refused
    assert max(run.ttft.values()) == pytest.approx(8 * 8 * STEP + STEP)
    tight = simulate([(0.0, _req(i)) for i in range(33)], AdmissionConfig(max_queue_delay=3.0))
    assert [r.request_id for _, r, _ in tight.refused] == ["r32"]
    old = simulate([(0.0, _req(i)) for i in range(33)], AdmissionConfig(max_queue_delay=0, max_waiting_requests=4))
    assert (len(old.ttft), len(old.refused)) == (8, 25)


def test_a_refused_client_that_comes_back_after_retry_after_is_admitted() -> None:
    run = simulate([(0.0, _req(i)) for i in range(30)], AdmissionConfig(max_queue_delay=0.5))
    t, r, e = run.refused[-1]
    back = t + int(e.headers["Retry-After"])
    again = simulate([(0.0, _req(i)) for i in range(30)] + [(back, _req(99))], AdmissionConfig(max_queue_delay=0.5))
    assert "r99" in again.ttft, [x[1].request_id for x in again.refused]


def test_a_timeout_shorter_than_the_predicted_wait_is_refused_at_once_naming_timeout() -> None:
    bound = AdmissionConfig(max_queue_delay=5.0)
    run = simulate([(0.0, _req(i)) for i in range(12)] + [(0.0, _req(50, timeout=0.3))], bound)
    ((_, r, e),) = run.refused
    assert r.request_id == "r50" and (e.status, e.param) == (429, "timeout") and "timeout" in e.message
    assert int(e.headers["Retry-After"]) >= math.ceil(8 * STEP - 0.3)  # it waits for a row: > 8 steps
    assert run.backlog.refused_by_reason["timeout"] == 1 and run.backlog.refused_by_reason["queue_delay"] == 0
    idle = simulate([(0.0, _req(51, prompt=200, timeout=0.1))], bound)  # 4 steps of prompt alone
    ((_, _, e),) = idle.refused  # not even an idle server can: a 400, retrying cannot help
    assert (e.status, e.param) == (400, "timeout") and "idle server" in e.message
