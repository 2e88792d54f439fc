"""Admission control: admit a request only if it can be served in time; refuse the rest at once.

Central rule: a request is admitted only if its **predicted wait** for its first token, behind the
work already admitted, is within ``--max-queue-delay`` (and its own ``timeout``); otherwise it is
refused at once with 429, ``Retry-After`` (the predicted time until it would fit) and OpenAI's
error object, before any work is done for it. The prediction (:mod:`predicted_wait`) replays the
admitted requests over the engine's rows at the engine's measured step cost (:mod:`step_cost`).
An empty server admits anything (a single request larger than a bound is not refused forever).

Two hard bounds stay, sized for memory rather than latency, so that the prediction is what
normally decides: requests in flight (``--max-seqs + --max-waiting-requests``) and prompt tokens
waiting for their first token (``--max-waiting-prompt-tokens``). ``--max-queue-delay 0`` turns the
prediction off and leaves the bounds alone to decide: the rule of this step before the prediction,
which with small bounds (the old defaults: 4 waiting requests) refuses bursts an idle server could
serve, and with large ones admits work that waits for seconds. Each choice of a request (``n``,
several prompts) is one engine request; a request's choices are admitted or refused together.

The backlog lives on the event loop: the API admits a request's choices (before the response
starts, so a refusal can still be a 429); the backlog is also one of the engine's request policies
(``AsyncEngine(..., request_policies=[backlog])``), so the engine's ``generate`` claims each choice
(``on_arrival``; a request that comes without the API is admitted there, so the bounds hold for
in-process use too), counts its tokens and removes it when it ends. A reservation that
``generate`` never claims (the client left between the two) is released by the API, or expires
after ``STALE_S``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Sequence

from shared.config import flag_field
from shared.engine import GenerationRequest
from shared.errors import RequestError
from step06_backpressure.predicted_wait import Prediction, Work, predict
from step06_backpressure.step_cost import StepCost, StepCostModel

STALE_S = 5.0  # an unclaimed reservation older than this is a leak, not a request
PROBE = Work(1, 1)  # the request /ready and /health predict the wait of
REASONS = ("queue_delay", "timeout", "in_flight", "prompt_tokens")  # why a request was refused


@dataclasses.dataclass(frozen=True, slots=True)
class AdmissionConfig:
    max_queue_delay: float = flag_field(
        0.1, "most predicted wait in seconds before a request's prefill can start; beyond: 429 with "
        "Retry-After the predicted time until it fits (0: off, only the hard bounds decide)")
    max_waiting_requests: int = flag_field(
        256, "hard bound: most requests admitted beyond --max-seqs, waiting for a row (in flight: at most "
        "the sum); beyond: 429. 0 admits only what a free row can start at once")
    max_waiting_prompt_tokens: int = flag_field(
        0, "hard bound: most prompt tokens of the requests waiting for their first token; beyond: 429 "
        "(0: (--max-seqs + --max-waiting-requests) x --max-num-batched-tokens)")
    retry_after: int = flag_field(1, "seconds a client refused by a hard bound (429) or turned away (503) is "
                                  "told to wait (Retry-After)")
    request_timeout: float = flag_field(
        0.0, "default deadline of a request in seconds from its arrival (0: none); a request's "
        "`timeout` field overrides it. Past it: an error before the first token, else finish_reason length")

    def __post_init__(self) -> None:
        if not self.max_queue_delay >= 0:
            raise ValueError(f"max_queue_delay must be >= 0, got {self.max_queue_delay}")
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.max_waiting_prompt_tokens < 0:
            raise ValueError(f"max_waiting_prompt_tokens must be >= 0, got {self.max_waiting_prompt_tokens}")
        if self.retry_after < 1:
            raise ValueError(f"retry_after must be >= 1, got {self.retry_after}")
        if self.request_timeout < 0:
            raise ValueError(f"request_timeout must be >= 0, got {self.request_timeout}")


@dataclasses.dataclass(frozen=True, slots=True)
class AdmissionStats:
    num_in_flight: int  # admitted requests not yet ended
    max_in_flight: int
    num_waiting_prompt_tokens: int  # of the admitted requests without a first token
    max_waiting_prompt_tokens: int
    num_refused: int  # requests (not choices) answered 429
    num_refused_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)  # REASONS
    predicted_wait_s: float | None = None  # of a one-token request now (None: prediction off or cold)
    max_queue_delay_s: float = 0.0
    step_cost: StepCost | None = None  # the engine's measured step cost the prediction uses


@dataclasses.dataclass(slots=True)
class _Admitted:
    request: GenerationRequest  # held, so that its id() stays unique while it is here
    since: float
    claimed: bool = False
    waiting: bool = True  # no first token yet
    num_tokens: int = 0  # streamed so far


class Backlog:
    """The admitted requests, until they end. Event loop only (no locks needed)."""

    name = "admission"

    def __init__(self, config: AdmissionConfig, max_running: int, step_tokens: int = 256,
                 cost: StepCostModel | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """``max_running``: the engine's rows (``--max-seqs``); ``step_tokens``: its step budget;
        ``cost``: the engine's measured step cost (an observer of its core); without it, or with
        ``--max-queue-delay 0``, only the hard bounds decide; ``clock``: the steps' clock."""
        self.config, self.max_running, self.step_tokens, self.clock = config, max_running, step_tokens, clock
        self.cost = cost if config.max_queue_delay > 0 else None
        self.max_in_flight = max_running + config.max_waiting_requests
        self.max_waiting_tokens = config.max_waiting_prompt_tokens or self.max_in_flight * step_tokens
        self._admitted: dict[int, _Admitted] = {}  # id(request): X-Request-Id may repeat request ids
        self.num_waiting_tokens = 0  # prompt tokens of the admitted requests without a first token
        self.refused_by_reason = dict.fromkeys(REASONS, 0)  # requests (not choices) answered 429

    @property
    def refused(self) -> int:
        return sum(self.refused_by_reason.values())

    @property
    def num_in_flight(self) -> int:
        return len(self._admitted)

    def predict(self, new: Sequence[Work]) -> Prediction | None:
        """The wait of the last of ``new`` behind everything admitted (None: no measured cost)."""
        cost = self.cost.cost if self.cost is not None else None
        if cost is None:
            return None
        left, waiting = [], []
        for a in self._admitted.values():  # in admission order (dicts keep insertion order)
            if a.waiting:
                waiting.append(_work(a.request))
            else:
                left.append(max(0, a.request.params.max_tokens - a.num_tokens))
        return predict(cost, self.max_running, self.step_tokens, left, waiting, new, self.clock())

    def overloaded(self) -> bool:
        """No room for even a one-token request now: what ``/ready`` reports."""
        if self.num_in_flight >= self.max_in_flight or self.num_waiting_tokens >= self.max_waiting_tokens:
            return True
        p = self.predict([PROBE]) if self._admitted else None
        return p is not None and p.wait_s > self.config.max_queue_delay

    def admit(self, requests: Sequence[GenerationRequest]) -> None:
        """Reserve room for all of ``requests`` (one client request), or raise a 429."""
        now = self.clock()
        self._expire(now)
        c = self.config
        tokens = sum(len(r.prompt_token_ids) for r in requests)
        if self._admitted and self.num_in_flight + len(requests) > self.max_in_flight:
            self._refuse("in_flight", c.retry_after, f"{self.num_in_flight} requests in flight (at most "
                         f"{self.max_in_flight})")
        if self._admitted and self.num_waiting_tokens + tokens > self.max_waiting_tokens:
            self._refuse("prompt_tokens", c.retry_after, f"{self.num_waiting_tokens} prompt tokens waiting for "
                         f"their first token (at most {self.max_waiting_tokens})")
        self._check_wait(requests)
        for r in requests:
            self._admitted[id(r)] = _Admitted(r, now)
            self.num_waiting_tokens += len(r.prompt_token_ids)

    def _check_wait(self, requests: Sequence[GenerationRequest]) -> None:
        """The predicted-wait rule: ``--max-queue-delay`` (not on an empty server), and the
        request's own deadline (a 400 if even an idle server could not meet it)."""
        new = [_work(r) for r in requests]
        p = self.predict(new)
        if p is None:
            return
        timeout = next((r.timeout for r in requests if r.timeout is not None), None) or self.config.request_timeout
        if timeout and p.ttft_s > timeout:
            alone = predict(self.cost.cost, self.max_running, self.step_tokens, [], [], new)  # type: ignore[union-attr]
            if alone.ttft_s > timeout:
                raise RequestError(f"timeout: {timeout:g} s is shorter than this request needs for its first "
                                   f"token on an idle server (about {alone.ttft_s:.2f} s)", param="timeout")
            self._refuse("timeout", p.retry_after(timeout, of_ttft=True),
                         f"its predicted time to first token is {p.ttft_s:.2f} s, beyond its timeout of {timeout:g} s",
                         param="timeout")
        if self._admitted and p.wait_s > self.config.max_queue_delay:
            self._refuse("queue_delay", p.retry_after(self.config.max_queue_delay),
                         f"its predicted wait is {p.wait_s:.2f} s (at most {self.config.max_queue_delay:g} s)")

    def _refuse(self, reason: str, retry_after: int, why: str, param: str | None = None) -> None:
        self.refused_by_reason[reason] += 1
        raise RequestError(f"The server is overloaded: {why}. Retry after {retry_after} s.", status=429,
                           type="rate_limit_error", code="server_overloaded", param=param,
                           headers={"Retry-After": str(retry_after)})

    def _get(self, request: GenerationRequest) -> _Admitted | None:
        a = self._admitted.get(id(request))
        return a if a is not None and a.request is request else None

    def claim(self, request: GenerationRequest) -> bool:
        """The engine starts ``request``: False if it was never admitted."""
        a = self._get(request)
        if a is not None:
            a.claimed = True
        return a is not None

    def first_token(self, request: GenerationRequest) -> None:
        """``request`` streams: its prompt is no longer work ahead of others. Idempotent."""
        a = self._get(request)
        if a is not None and a.waiting:
            a.waiting = False
            self.num_waiting_tokens -= len(request.prompt_token_ids)

    def finish(self, request: GenerationRequest) -> None:
        """``request`` ended (finished, aborted, failed): its room is free. Idempotent."""
        if self._get(request) is not None:
            self.first_token(request)
            del self._admitted[id(request)]

    def release_unclaimed(self, requests: Iterable[GenerationRequest]) -> None:
        """The API is done with these: any the engine never claimed leave."""
        for r in requests:
            a = self._get(r)
            if a is not None and not a.claimed:
                self.finish(r)

    def _expire(self, now: float) -> None:
        for a in [a for a in self._admitted.values() if not a.claimed and now - a.since > STALE_S]:
            self.finish(a.request)

    # ---- the engine's request-policy hooks (step 04's ``RequestPolicy``) ------------------------

    def on_arrival(self, request: GenerationRequest) -> None:
        """The engine starts ``request``: claim the API's reservation, or admit it now (or 429)."""
        if not self.claim(request):
            self.admit([request])
            self.claim(request)

    def on_token(self, request: GenerationRequest) -> None:
        if (a := self._get(request)) is not None:
            a.num_tokens += 1
            self.first_token(request)

    def on_finish(self, request: GenerationRequest) -> None:
        self.finish(request)

    def stats(self) -> AdmissionStats:
        p = self.predict([PROBE]) if self.cost is not None else None
        return AdmissionStats(self.num_in_flight, self.max_in_flight, self.num_waiting_tokens, self.max_waiting_tokens,
                              self.refused, dict(self.refused_by_reason), None if p is None else p.wait_s,
                              self.config.max_queue_delay, None if self.cost is None else self.cost.cost)


def _work(r: GenerationRequest) -> Work:
    return Work(len(r.prompt_token_ids), r.params.max_tokens)
