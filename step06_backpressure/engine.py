"""``BackpressureEngine``: step 05's engine with a bounded backlog and per-request deadlines.

Admission (``admission.Backlog``): ``generate`` claims the reservation the API made (or, for a
request that comes without the API, admits it here, so the bound holds for in-process use too),
marks its first token, and frees its room when it ends.

Deadlines, checked on the engine thread at the start of every step, before step 04's own reaping
of cancelled requests:

* past its deadline before its first token (queued or prefilling): the request fails with
  ``DeadlineExceeded`` (HTTP 504 ``deadline_exceeded`` without streaming; an in-band error event
  when streaming, since the 200 has already been sent); its row, if it had one, is freed now;
* past its deadline while generating: its next token is its last, with ``finish_reason`` "length",
  exactly as if ``max_tokens`` had been reached: a complete, well-formed response.

Cancellation needs nothing new here: step 04 drops an aborted request at the next step and frees
its row; step 06's gate (``gate.py``) makes sure that a client that disconnects *is* aborted, even
while its request is still queued and has sent nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, AsyncIterator

from shared.engine import GenerationRequest, TokenEvent
from shared.errors import RequestError
from step02_queue.engine import Entry
from step04_kvcache.sequence import Sequence
from step05_observability.engine import ObservedEngine
from step06_backpressure.admission import AdmissionConfig, Backlog


@dataclasses.dataclass(frozen=True, slots=True)
class TimedRequest(GenerationRequest):
    """A request with the client's own ``timeout`` (seconds from arrival); None: the server default."""

    timeout: float | None = None


class DeadlineExceeded(RequestError):
    def __init__(self, timeout: float) -> None:
        super().__init__(f"deadline exceeded: no token within the request's timeout of {timeout:g} s",
                         param="timeout", status=504, type="timeout", code="deadline_exceeded")


class BackpressureEngine(ObservedEngine):
    def __init__(self, *args: Any, admission: AdmissionConfig = AdmissionConfig(), **kwargs: Any) -> None:
        """``args``/``kwargs``: step 05's (model, scheduler, runner, observability configs...)."""
        super().__init__(*args, **kwargs)
        self.admission = admission
        self.backlog = Backlog(admission, self.sched_cfg.max_seqs, self.sched_cfg.max_num_batched_tokens)  # event loop
        self.deadlines_exceeded = 0  # engine thread writes; an int, read anywhere

    def timeout_of(self, request: GenerationRequest) -> float | None:
        """Seconds from arrival that ``request`` may take, or None for no deadline."""
        own = request.timeout if isinstance(request, TimedRequest) else None
        if own is not None:
            return own
        return self.admission.request_timeout or None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if not self.backlog.claim(request):
            self.backlog.admit([request])  # 429 if the backlog is full
            self.backlog.claim(request)
        try:
            async with contextlib.aclosing(super().generate(request)) as events:
                async for event in events:
                    self.backlog.first_token(request)
                    yield event
        finally:
            self.backlog.finish(request)

    # ---- the engine thread ------------------------------------------------------------------

    def _step(self) -> None:
        self._expire(time.monotonic())
        super()._step()

    def _expire(self, now: float) -> None:
        """Deadlines: fail requests without a token, cut the others short at their next token."""
        for seq, entry in list(self._entries.items()):
            timeout = self.timeout_of(entry.request)
            if timeout is None or now < seq.arrival_time + timeout or entry.cancelled.is_set():
                continue
            if seq.num_output_tokens == 0:
                self._fail_one(seq, entry, DeadlineExceeded(timeout), now)
                self.deadlines_exceeded += 1
            elif seq.params.max_tokens > seq.num_output_tokens + 1:
                seq.params = dataclasses.replace(seq.params, max_tokens=seq.num_output_tokens + 1)
                self.deadlines_exceeded += 1

    def _fail_one(self, seq: Sequence, entry: Entry, error: Exception, now: float) -> None:
        self.scheduler.finish(seq, "error")  # out of waiting or running; a row is freed now
        self._outbox.append((entry, error))
        self._retire(seq, now)

    # ---- anywhere -----------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        return {**super().stats(), **self.backlog.stats(), "deadlines_exceeded": self.deadlines_exceeded}
