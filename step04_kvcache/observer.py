"""The engine's observers: what the loop reports after every step and every finished request.

An observer is a part of the engine (``EngineCore(..., observers=[...])``); step 05's metrics and
request log are two. No step 04 code path changes for them. The callbacks run on the engine thread between two steps, so they must be
short (counters, a histogram observation) and thread-safe if they share state with the event loop.
Times: ``*_time`` fields are ``time.monotonic()`` instants (``GenerationRequest.arrival_time``'s
clock); ``*_s`` fields are durations in seconds from ``time.perf_counter()``.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass(frozen=True, slots=True)
class StepStats:
    time: float  # end of the step
    num_decode_seqs: int
    num_prefill_seqs: int
    num_prefill_tokens: int
    num_sampled: int  # tokens produced: one per row that samples (decodes, prefills that ended their
    # prompt); step 09's verification may produce several per row
    num_running: int  # after the step
    num_waiting: int
    kv_slots_used: int  # KV positions reserved by running sequences (the scheduler's accounting)
    kv_slots_total: int
    schedule_s: float  # reap aborted requests, admit, choose the batch
    prepare_s: float  # build_batch: input ids, positions, attention metadata (once per step)
    model_s: float  # Transformer.forward (attention plans, layers, LM head on sampling rows)
    sample_s: float  # the one batched sample() call
    step_s: float  # the whole step, including bookkeeping (not the hand-off of its events)
    # (request id, tokens it fed this step): decodes first (one each; step 09 adds its drafts to
    # their sequences' rows), then prefill chunks; what the playground's engine view draws
    scheduled: tuple[tuple[str, int], ...] = ()

    @property
    def batch_size(self) -> int:
        return self.num_decode_seqs + self.num_prefill_seqs

    @property
    def num_batched_tokens(self) -> int:
        return self.num_decode_seqs + self.num_prefill_tokens

    @property
    def overhead_s(self) -> float:
        """Everything but the forward pass: the server's cost of this step."""
        return self.step_s - self.model_s


@dataclasses.dataclass(frozen=True, slots=True)
class RequestStats:
    request_id: str
    arrival_time: float
    first_token_time: float | None  # None if it never produced a token
    finish_time: float
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str  # "stop", "length", "abort" or "error"
    first_scheduled_time: float | None = None  # start of the step that first ran it (None: never ran)


class EngineObserver(Protocol):
    def on_step(self, stats: StepStats) -> None: ...

    def on_request_finished(self, stats: RequestStats) -> None: ...

