"""Admission control: a bound on the work admitted, so that admitted work keeps its latency.

Central rule: a request is admitted only if, with it, (1) the requests in flight stay within
``--max-seqs + --max-waiting-requests`` (every running row full, and at most that many waiting
for one) and (2) the prompt tokens of the requests still waiting for their first token stay within
``--max-waiting-prompt-tokens``; otherwise it is refused at once with 429, ``Retry-After`` and
OpenAI's error object, before any work is done for it. An empty server admits anything (a single
request larger than a bound is not refused forever).

Why these two: a request that finds a free row starts at the next step; one that does not waits
for a running request to finish, about ``1 / capacity`` seconds per request ahead of it, so the
first bound caps the queueing part of the time to first token. The second caps the prefill work
ahead of a new request. Its default admits a burst that fills every row (``--max-seqs`` prompts
of a step's budget each); under overload, a bound of about one step's budget keeps a new
request's prompt behind at most one step of others (the README measures it). Each choice of a
request (``n``, several prompts) is one engine request and counts as one; a request's choices
are admitted or refused together.

The backlog lives on the event loop: the API admits a request's choices (before the response
starts, so a refusal can still be a 429); the backlog is also one of the engine's request policies
(``AsyncEngine(..., request_policies=[backlog])``), so the engine's ``generate`` claims each choice
(``on_arrival``; a request that comes without the API is admitted there, so the bound holds for
in-process use too), marks its first token and removes it when it ends. A reservation that
``generate`` never claims (the client left between the two) is released by the API, or expires
after ``STALE_S``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Sequence

from shared.config import flag_field
from shared.engine import GenerationRequest
from shared.errors import RequestError

STALE_S = 5.0  # an unclaimed reservation older than this is a leak, not a request


@dataclasses.dataclass(frozen=True, slots=True)
class AdmissionConfig:
    max_waiting_requests: int = flag_field(
        4, "most requests admitted beyond --max-seqs, waiting for a row (in flight: at most the sum); "
        "beyond: 429. 0 admits only what a free row can start at once")
    max_waiting_prompt_tokens: int = flag_field(
        0, "most prompt tokens of the requests waiting for their first token; beyond: 429 (0: --max-seqs x "
        "--max-num-batched-tokens, a burst that fills every row). Lower bounds the TTFT under overload")
    retry_after: int = flag_field(1, "seconds a refused (429) or turned-away (503) client is told to wait "
                                  "(Retry-After)")
    request_timeout: float = flag_field(
        0.0, "default deadline of a request in seconds from its arrival (0: none); a request's "
        "`timeout` field overrides it. Past it: an error before the first token, else finish_reason length")

    def __post_init__(self) -> None:
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


@dataclasses.dataclass(slots=True)
class _Admitted:
    request: GenerationRequest  # held, so that its id() stays unique while it is here
    since: float
    claimed: bool = False
    waiting: bool = True  # no first token yet


class Backlog:
    """The admitted requests, until they end. Event loop only (no locks needed)."""

    name = "admission"

    def __init__(self, config: AdmissionConfig, max_running: int, step_tokens: int = 256) -> None:
        """``max_running``: the engine's rows (``--max-seqs``); ``step_tokens``: its step budget."""
        self.config = config
        self.max_in_flight = max_running + config.max_waiting_requests
        self.max_waiting_tokens = config.max_waiting_prompt_tokens or max_running * step_tokens
        self._admitted: dict[int, _Admitted] = {}  # id(request): X-Request-Id may repeat request ids
        self.num_waiting_tokens = 0  # prompt tokens of the admitted requests without a first token
        self.refused = 0  # requests (not choices) answered 429

    @property
    def num_in_flight(self) -> int:
        return len(self._admitted)

    def overloaded(self) -> bool:
        """No room for even a one-token request: what ``/ready`` reports."""
        return (self.num_in_flight >= self.max_in_flight
                or self.num_waiting_tokens >= self.max_waiting_tokens)

    def admit(self, requests: Sequence[GenerationRequest]) -> None:
        """Reserve room for all of ``requests`` (one client request), or raise a 429."""
        now = time.monotonic()
        self._expire(now)
        c = self.config
        tokens = sum(len(r.prompt_token_ids) for r in requests)
        if self._admitted and (self.num_in_flight + len(requests) > self.max_in_flight
                               or self.num_waiting_tokens + tokens > self.max_waiting_tokens):
            self.refused += 1
            raise RequestError(
                f"The server is overloaded: {self.num_in_flight} requests in flight (at most {self.max_in_flight}), "
                f"{self.num_waiting_tokens} prompt tokens waiting (at most {self.max_waiting_tokens}). "
                f"Retry after {c.retry_after} s.", status=429, type="rate_limit_error",
                code="server_overloaded", headers={"Retry-After": str(c.retry_after)})
        for r in requests:
            self._admitted[id(r)] = _Admitted(r, now)
            self.num_waiting_tokens += len(r.prompt_token_ids)

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

    def on_first_token(self, request: GenerationRequest) -> None:
        self.first_token(request)

    def on_finish(self, request: GenerationRequest) -> None:
        self.finish(request)

    def stats(self) -> AdmissionStats:
        return AdmissionStats(self.num_in_flight, self.max_in_flight, self.num_waiting_tokens,
                              self.max_waiting_tokens, self.refused)
