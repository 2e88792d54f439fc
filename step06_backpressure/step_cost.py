"""The engine's measured cost of a step: what admission predicts a request's wait from.

Central rule: a step takes ``base + per_decode x (decode rows) + per_prefill_token x (prompt
tokens)`` seconds, three coefficients fitted on the engine thread after every step by
exponentially weighted least squares (each step counts ``DECAY`` as much as the next one: a memory
of about 50 steps), pulled towards the start-up measurement (a ridge of ``PRIOR_WEIGHT`` steps)
where the recent steps say nothing about a coefficient: a server that only decoded for a minute
still knows what a prompt token costs. Beside the fit it keeps the pace the engine really goes at
(a moving average of the steps as they come, prefill chunks included: what a running request's
remaining tokens take) and when the last step ended (what is left of the one running now). All of
it is published as one frozen :class:`StepCost`, so the event loop reads it without a lock.

A cold server has measured nothing, so :func:`calibrate` runs a few requests through a throwaway
core over the real runner before the server says it is ready: a long prompt then one sequence
decoding, and a full batch of short prompts then every row decoding. That gives the three
coefficients something to tell apart; it runs twice and keeps the second pass (the first pays
for first-call allocations and step 10's compilation).

Left out: a cost per cached KV token (attention's share grows with context; at these lengths the
weights dominate), and separate rates for a speculative step's verified drafts (they count as the
decode rows they are).
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Callable, Sequence

import numpy as np
import torch

from shared.engine import GenerationRequest
from shared.sampling import SamplingParams
from step04_kvcache.engine_core import EngineCore, Entry, StepPolicy
from step04_kvcache.observer import EngineObserver, RequestStats, StepStats
from step04_kvcache.scheduler import SchedulerConfig

log = logging.getLogger("step06_backpressure")
DECAY = 0.98  # weight of a step relative to the one after it
RECENT = 0.1  # weight of the newest step in the moving average of step times
PRIOR_WEIGHT = 2.0  # the start-up fit counts as this many steps in each direction


@dataclasses.dataclass(frozen=True, slots=True)
class StepCost:
    base_s: float  # a step's fixed cost: the weights read once, the LM head, the bookkeeping
    per_decode_s: float  # each decode row
    per_prefill_token_s: float  # each prompt token
    num_steps: int  # steps measured so far (calibration included)
    recent_step_s: float = 0.0  # moving average of the steps as they come (prefill chunks and all)
    last_step_end: float = 0.0  # time.monotonic() at the end of the last step: the next began then

    def in_progress_s(self, now: float) -> float:
        """What is left of the step running now (the engine starts the next as one ends)."""
        return max(0.0, self.last_step_end + self.recent_step_s - now)

    def step_s(self, num_decodes: int, num_prefill_tokens: int = 0) -> float:
        return self.base_s + self.per_decode_s * num_decodes + self.per_prefill_token_s * num_prefill_tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return 1.0 / self.per_prefill_token_s if self.per_prefill_token_s > 0 else float("inf")


class StepCostModel:
    """An engine observer (step 04's protocol): refits after every step."""

    def __init__(self, max_seqs: int, step_tokens: int) -> None:
        self.scale = np.array([1.0, float(max_seqs), float(step_tokens)])  # features in [0, 1]: a fair ridge
        self._a = np.zeros((3, 3))
        self._b = np.zeros(3)
        self._prior = np.zeros(3)
        self._prior_weight = 0.0  # none until calibrated
        self._n = 0
        self._recent = 0.0
        self.cost: StepCost | None = None  # read on the event loop; None: nothing measured yet

    def on_step(self, stats: StepStats) -> None:
        x = np.array([1.0, stats.num_decode_seqs, stats.num_prefill_tokens]) / self.scale
        self._a = DECAY * self._a + np.outer(x, x)
        self._b = DECAY * self._b + x * stats.step_s
        self._n += 1
        self._recent = stats.step_s if self._n == 1 else (1 - RECENT) * self._recent + RECENT * stats.step_s
        self.cost = self._solve(stats.time)

    def on_request_finished(self, stats: RequestStats) -> None:
        pass

    def _solve(self, now: float) -> StepCost:
        ridge = self._prior_weight if self._prior_weight else 1e-6  # before calibration: least squares
        theta = np.linalg.solve(self._a + ridge * np.eye(3), self._b + ridge * self._prior)
        base, per_decode, per_token = (np.maximum(theta, 0.0) / self.scale).tolist()
        return StepCost(base, per_decode, per_token, self._n, self._recent, now)

    def reset(self) -> None:
        """Forget what was measured (calibration's first pass)."""
        self._a, self._b, self._n, self._recent, self.cost = np.zeros((3, 3)), np.zeros(3), 0, 0.0, None

    def keep_as_prior(self) -> None:
        """The fit so far (calibration's) is what the model falls back on from now on."""
        if self.cost is not None:
            c = self.cost
            self._prior = np.array([c.base_s, c.per_decode_s, c.per_prefill_token_s]) * self.scale
            self._prior_weight = PRIOR_WEIGHT


def calibrate(core: EngineCore, model: StepCostModel, max_seqs: int, step_tokens: int, vocab_size: int,
              passes: int = 2, max_steps: int = 200) -> None:
    """Measure the step cost on ``core`` (a throwaway core whose only observer is ``model``, over
    the runner the server will use) before serving. On the engine thread. A failure leaves the
    model cold (admission then uses only its hard bounds), never the server down."""
    rng = random.Random(0)
    long_len = max(1, min(step_tokens, core.runner.max_len - 8))
    short_len = max(1, min(8, step_tokens // max_seqs, core.runner.max_len - 8))

    def requests(tag: str) -> list[list[GenerationRequest]]:
        def one(i: int, n: int) -> GenerationRequest:
            ids = tuple(rng.randrange(3, max(4, min(vocab_size, 1000))) for _ in range(n))
            return GenerationRequest(f"calibration-{tag}-{i}", ids, SamplingParams(max_tokens=4, temperature=0,
                                                                                   ignore_eos=True), time.monotonic())
        return [[one(0, long_len)], [one(1 + i, short_len) for i in range(max_seqs)]]

    try:
        with torch.inference_mode():
            for p in range(passes):
                model.reset()
                for group in requests(str(p)):
                    for r in group:
                        core.add(Entry(r, None))  # type: ignore[arg-type]  # nobody reads the outputs
                    for _ in range(max_steps):
                        if not core.has_work():
                            break
                        core.step()
        model.keep_as_prior()
        c = model.cost
        if c is not None:
            log.info("step cost: %.1f ms + %.2f ms per decode row + %.3f ms per prompt token (%d steps)",
                     c.base_s * 1e3, c.per_decode_s * 1e3, c.per_prefill_token_s * 1e3, c.num_steps)
    except Exception:
        log.exception("measuring the step cost failed; admission by predicted wait is off until steps are measured")


def measured_core(build: Callable[[list[EngineObserver], list[StepPolicy]], EngineCore], cost: StepCostModel,
                  sched: SchedulerConfig, vocab_size: int, observers: Sequence[EngineObserver],
                  policies: Sequence[StepPolicy]) -> EngineCore:
    """The server's core, ``build(observers + [cost], policies)``, after :func:`calibrate` ran on a
    throwaway ``build([cost], [])`` over the same runner: the server's own counters (metrics, the
    prefix cache's, speculation's) never see the calibration requests."""
    calibrate(build([cost], []), cost, sched.max_seqs, sched.max_num_batched_tokens, vocab_size)
    return build([*observers, cost], list(policies))
