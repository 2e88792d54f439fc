"""Predict a new request's wait for its first token from the work admitted before it.

Central rule: replay the admitted requests in arrival order over the engine's rows, at the
measured step cost, from the end of the step running now. A request's prefill starts when it has
a row (``--max-seqs``: a running request gives its row back after its remaining tokens, one step
each at the pace the engine goes, prefill chunks included) and the prompts
admitted before it are done (prefill is first come, first served); it ends its prompt's tokens
later (prompts share steps, in chunks of what a step's budget leaves beside the decodes, each
paying its share), and then holds its row for ``max_tokens - 1`` more decode steps. The new request's **wait** is when its own prefill can start; its
**time to first token** is when that prefill ends.

It is an estimate, and a cautious one: a request is assumed to run to its ``max_tokens`` (an end
of sequence frees the row sooner), prompts are assumed uncached (step 07's prefix cache skips
some), and a step 07 server short of KV blocks may preempt, which it does not see.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Sequence

from step06_backpressure.step_cost import StepCost


@dataclasses.dataclass(frozen=True, slots=True)
class Work:
    """An admitted request that has no first token yet, or the new one."""

    prompt_tokens: int
    max_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class Prediction:
    wait_s: float  # until the request's prefill can start: a free row, and the prompts ahead done
    ttft_s: float  # until its first token: the wait plus its own prefill
    row_wait_s: float  # of the wait, until a row was free

    def retry_after(self, bound_s: float, of_ttft: bool = False) -> int:
        """Whole seconds until the prediction would be within ``bound_s``: the queue ahead drains in
        real time, so the excess is how long a client should wait (at least 1)."""
        excess = (self.ttft_s if of_ttft else self.wait_s) - bound_s
        return max(1, math.ceil(excess))


def predict(cost: StepCost, max_seqs: int, step_tokens: int, tokens_left: Sequence[int], waiting: Sequence[Work],
            new: Sequence[Work], now: float | None = None) -> Prediction:
    """The prediction for the last of ``new`` (one client request's choices, in order).

    ``tokens_left``: the running requests' remaining output tokens (each holds a row);
    ``waiting``: the admitted requests without a first token, in arrival order; ``now``: the
    ``time.monotonic()`` of the question, to count what is left of the step running (None: none)."""
    queue = [*waiting, *new]
    in_flight = len(tokens_left) + len(queue)
    decoding = min(max_seqs, max(1, in_flight))  # rows decoding while this queue drains
    busy = bool(tokens_left or waiting)
    decode_s = max(cost.step_s(decoding), cost.recent_step_s if tokens_left else 0.0)  # the pace it goes at
    t0 = cost.in_progress_s(now) if busy and now is not None else 0.0  # nothing new joins the step running
    room = max(1, step_tokens - min(max_seqs, len(tokens_left)))  # prompt tokens a step takes beside the decodes
    chunk_s = cost.step_s(decoding - 1)  # a step's cost beside its prompt tokens

    def prefill_s(tokens: int) -> float:  # prompts share steps: each pays its share of them
        return tokens / room * chunk_s + tokens * cost.per_prefill_token_s

    rows = [t0 + n * decode_s for n in sorted(tokens_left)[:max_seqs]]  # when each busy row is free
    rows += [t0] * (max_seqs - len(rows))
    heapq.heapify(rows)
    prefill_end, start, row_free, ttft = t0, t0, t0, t0
    for w in queue:
        row_free = heapq.heappop(rows)
        start = max(row_free, prefill_end)
        prefill_end = start + prefill_s(w.prompt_tokens)
        # its first token comes at the end of a whole step: at least one step after it starts
        ttft = max(prefill_end, start + chunk_s + w.prompt_tokens * cost.per_prefill_token_s)
        heapq.heappush(rows, ttft + (w.max_tokens - 1) * decode_s)
    return Prediction(start, ttft, row_free)
