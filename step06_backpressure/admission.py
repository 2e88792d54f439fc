"""Admission control: a bounded backlog of requests that are waiting for their first token.

Central rule: a request is admitted only if the backlog, with it, stays within both bounds
(``--max-waiting-requests`` and ``--max-waiting-prompt-tokens``); otherwise it is refused at once
with 429, ``Retry-After`` and OpenAI's error object, before any work is done for it. An empty
backlog admits anything (a single request larger than a bound is not refused forever).

"Waiting" means admitted but not yet streaming: in the engine's queues, or holding a KV-cache row
while its prompt is prefilled. That is the work standing between a new request and its first
token, so bounding it bounds the time to first token of every admitted request. Each choice of a
request (``n``, several prompts) is one engine request and counts as one.

The backlog lives on the event loop: the API admits a request's choices together (before the
response starts, so a refusal can still be a 429), the engine's ``generate`` claims each one and
removes it on its first token or when it ends. A reservation that ``generate`` never claims (the
client left between the two) is released by the API, or expires after ``STALE_S``.
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
        32, "most requests waiting for their first token (queued or prefilling); beyond: 429")
    max_waiting_prompt_tokens: int = flag_field(
        16384, "most prompt tokens of the requests waiting for their first token; beyond: 429")
    retry_after: int = flag_field(1, "seconds a refused (429) or turned-away (503) client is told to wait "
                                  "(Retry-After)")
    request_timeout: float = flag_field(
        0.0, "default deadline of a request in seconds from its arrival (0: none); a request's "
        "`timeout` field overrides it. Past it: an error before the first token, else finish_reason length")

    def __post_init__(self) -> None:
        for name in ("max_waiting_requests", "max_waiting_prompt_tokens", "retry_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout < 0:
            raise ValueError(f"request_timeout must be >= 0, got {self.request_timeout}")


@dataclasses.dataclass(slots=True)
class _Waiting:
    request: GenerationRequest  # held, so that its id() stays unique while it waits
    since: float
    claimed: bool = False


class Backlog:
    """The admitted requests without a first token. Event loop only (no locks needed)."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._waiting: dict[int, _Waiting] = {}  # id(request): X-Request-Id may repeat request ids
        self.num_tokens = 0
        self.refused = 0  # requests (not choices) answered 429

    @property
    def num_requests(self) -> int:
        return len(self._waiting)

    def overloaded(self) -> bool:
        """No room for even a one-token request: what ``/ready`` reports."""
        c = self.config
        return self.num_requests >= c.max_waiting_requests or self.num_tokens >= c.max_waiting_prompt_tokens

    def admit(self, requests: Sequence[GenerationRequest]) -> None:
        """Reserve room for all of ``requests`` (one client request), or raise a 429."""
        now = time.monotonic()
        self._expire(now)
        c, n = self.config, len(requests)
        tokens = sum(len(r.prompt_token_ids) for r in requests)
        if self._waiting and (self.num_requests + n > c.max_waiting_requests
                              or self.num_tokens + tokens > c.max_waiting_prompt_tokens):
            self.refused += 1
            raise RequestError(
                f"The server is overloaded: {self.num_requests} requests ({self.num_tokens} prompt tokens) are "
                f"waiting; the limits are {c.max_waiting_requests} requests and {c.max_waiting_prompt_tokens} "
                f"tokens. Retry after {c.retry_after} s.", status=429, type="rate_limit_error",
                code="server_overloaded", headers={"Retry-After": str(c.retry_after)})
        for r in requests:
            self._waiting[id(r)] = _Waiting(r, now)
            self.num_tokens += len(r.prompt_token_ids)

    def claim(self, request: GenerationRequest) -> bool:
        """The engine starts ``request``: False if it was never admitted."""
        w = self._waiting.get(id(request))
        if w is None or w.request is not request:
            return False
        w.claimed = True
        return True

    def leave(self, request: GenerationRequest) -> None:
        """``request`` got its first token, or ended: it waits no more. Idempotent."""
        w = self._waiting.get(id(request))
        if w is not None and w.request is request:
            del self._waiting[id(request)]
            self.num_tokens -= len(request.prompt_token_ids)

    def release_unclaimed(self, requests: Iterable[GenerationRequest]) -> None:
        """The API is done with these: any the engine never claimed leave the backlog."""
        for r in requests:
            w = self._waiting.get(id(r))
            if w is not None and w.request is r and not w.claimed:
                self.leave(r)

    def _expire(self, now: float) -> None:
        stale = [w.request for w in self._waiting.values() if not w.claimed and now - w.since > STALE_S]
        for r in stale:
            self.leave(r)

    def stats(self) -> dict[str, float]:
        return {"admission_waiting_requests": self.num_requests, "admission_waiting_prompt_tokens": self.num_tokens,
                "refused_requests": self.refused}
