"""Deadlines: a request that cannot be served in time ends, cleanly, at the next step.

Central rule, checked on the engine thread before every step (a step policy of the engine:
``EngineCore(..., policies=[deadlines])``), for each request whose deadline (its own ``timeout``
field, else ``--request-timeout``; seconds from arrival) has passed:

* before its first token (queued or prefilling): the request fails with ``DeadlineExceeded``
  (HTTP 504 ``deadline_exceeded`` without streaming; an in-band error event when streaming, since
  the 200 has already been sent); its KV room, if it had any, is freed now;
* while generating: its next token is its last, with ``finish_reason`` "length", exactly as if
  ``max_tokens`` had been reached: a complete, well-formed response.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence as Seq

from shared.engine import GenerationRequest
from shared.errors import RequestError
from step04_kvcache.sequence import Sequence


class DeadlineExceeded(RequestError):
    def __init__(self, timeout: float) -> None:
        super().__init__(f"deadline exceeded: no token within the request's timeout of {timeout:g} s",
                         param="timeout", status=504, type="timeout", code="deadline_exceeded")


@dataclasses.dataclass(frozen=True, slots=True)
class DeadlineStats:
    num_deadlines_exceeded: int  # requests failed or cut short by their deadline


class Deadlines:
    name = "deadlines"

    def __init__(self, default_timeout: float = 0.0) -> None:
        """``default_timeout``: ``--request-timeout`` in seconds, for requests without their own (0: none)."""
        self.default_timeout = default_timeout
        self.num_exceeded = 0  # engine thread writes; an int, read anywhere

    def timeout_of(self, request: GenerationRequest) -> float | None:
        """Seconds from arrival that ``request`` may take, or None for no deadline."""
        if request.timeout is not None:
            return request.timeout
        return self.default_timeout or None

    def before_step(self, requests: Seq[tuple[Sequence, GenerationRequest]],
                    now: float) -> list[tuple[Sequence, Exception]]:
        failed: list[tuple[Sequence, Exception]] = []
        for seq, request in requests:
            timeout = self.timeout_of(request)
            if timeout is None or now < seq.arrival_time + timeout:
                continue
            if seq.num_output_tokens == 0:
                failed.append((seq, DeadlineExceeded(timeout)))
                self.num_exceeded += 1
            elif seq.params.max_tokens > seq.num_output_tokens + 1:
                seq.params = dataclasses.replace(seq.params, max_tokens=seq.num_output_tokens + 1)
                self.num_exceeded += 1
        return failed

    def stats(self) -> DeadlineStats:
        return DeadlineStats(self.num_exceeded)
