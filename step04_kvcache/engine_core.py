"""The one engine loop, assembled from parts: schedule -> prepare -> forward -> sample -> update.

Central rule: ``EngineCore`` owns no policy of its own. Each ``step()`` it lets the step policies
fail or shorten requests, drops cancelled sequences (their KV room is free for this very step),
asks the **scheduler** who runs, the **model runner** for one forward over them, the **sampler**
for every row's tokens (here :class:`RowSampler`: ONE call of the shared batched sampler, one
token per row; step 09's verifies speculative tokens), lets the scheduler record the tokens, and
reports the step and every finished request to the **observers**. What each part
does is its own business (how KV memory is handed out, what is measured, which requests are cut
short): every step from 04 on is this loop with other parts, assembled in its ``__main__``.

It is synchronous and single-threaded: the async front end (``engine.py``) calls it on its
engine thread, and nothing else touches the parts. ``add``, ``step`` and ``abort_all`` return the
outputs they produced, ``(entry, item)`` in order, where an item is a ``RequestFacts``, a
``TokenEvent``, an exception (the request failed) or ``DONE`` (the request's last item).

Left out on purpose: overlapping the CPU bookkeeping of one step with the forward of the next,
CUDA graphs, priorities.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any, Protocol, Sequence as Seq

import torch

from shared.engine import GenerationRequest, RequestFacts, TokenEvent
from shared.sampling import sample
from step04_kvcache.model_runner import ModelRunner
from step04_kvcache.prompt_logprobs import prompt_spans, record
from step04_kvcache.observer import EngineObserver, RequestStats, StepStats
from step04_kvcache.scheduler import Scheduler, SchedulerOutput
from step04_kvcache.sequence import Sequence

log = logging.getLogger("step04_kvcache")
DONE = object()  # a request's last output item


@dataclasses.dataclass(eq=False, slots=True)  # eq=False: identity (two requests may share an id)
class Entry:
    """A request on its way through the engine; the front end reads its items from ``out``. (Step
    02's queue has an entry of the same shape; this engine does not build on step 02's, on purpose.)"""

    request: GenerationRequest
    out: asyncio.Queue  # RequestFacts, TokenEvent, an exception, or DONE
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


Item = RequestFacts | TokenEvent | BaseException | object
Outputs = list[tuple[Entry, Item]]


class StepPolicy(Protocol):
    """A rule applied to the requests in the engine before every step (step 06's deadlines)."""

    name: str

    def before_step(self, requests: Seq[tuple[Sequence, GenerationRequest]],
                    now: float) -> list[tuple[Sequence, Exception]]:
        """The sequences to fail now, with their errors; it may also change a sequence's params
        (e.g. shorten ``max_tokens``)."""

    def stats(self) -> Any:
        """A frozen dataclass of its counters."""


class Sampler(Protocol):
    def sample(self, out: SchedulerOutput, rows: list[Sequence], logits: torch.Tensor) -> list[list[TokenEvent]]:
        """The tokens each sampling row produced, in order (``finish_reason`` unset), from the
        logits the runner returned for them."""


class RowSampler:
    """One token per sampling row: :func:`shared.sampling.sample` over the whole batch at once."""

    def __init__(self, eos_token_ids: tuple[int, ...]) -> None:
        self.eos_token_ids = eos_token_ids

    def sample(self, out: SchedulerOutput, rows: list[Sequence], logits: torch.Tensor) -> list[list[TokenEvent]]:
        s = sample(logits, [r.params for r in rows], [r.output_token_ids for r in rows],
                   [r.generator for r in rows], self.eos_token_ids)
        return [[TokenEvent(t, lp, top)] for t, lp, top in zip(s.token_ids, s.logprobs, s.top_logprobs)]


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, observers: Seq[EngineObserver] = (),
                 policies: Seq[StepPolicy] = (), sampler: Sampler | None = None) -> None:
        self.scheduler, self.runner = scheduler, runner
        self.sampler = sampler or RowSampler(scheduler.eos_token_ids)
        self.observers, self.policies = tuple(observers), tuple(policies)
        self.num_generated_tokens = 0  # tokens sampled, including those nobody read
        self._entries: dict[Sequence, Entry] = {}  # every sequence waiting or running
        self._outputs: Outputs = []

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def add(self, entry: Entry) -> Outputs:
        try:
            seq = self.scheduler.new_sequence(entry.request, self.runner.device)
            self.scheduler.add(seq)
        except Exception as e:  # this request is refused (too long, a seed torch refuses); the engine goes on
            return [(entry, e), (entry, DONE)]
        self._entries[seq] = entry
        return []

    def entries(self) -> list[Entry]:
        """The requests in the engine (waiting or running)."""
        return list(self._entries.values())

    def step(self) -> Outputs:
        t0, now = time.perf_counter(), time.monotonic()
        self._reap(now)
        out = self.scheduler.schedule()
        if out.is_empty:
            return self._take()
        scheduled = out.scheduled_seqs
        for seq in scheduled:  # a sequence's first scheduled step: its queue time ends
            if seq.first_scheduled_time is None:  # (whatever position its first chunk starts at)
                seq.first_scheduled_time = now
        t1 = time.perf_counter()
        rows = out.sampling_seqs
        try:
            inputs = self.runner.prepare(out)
            t2 = time.perf_counter()
            logits = self.runner.forward(inputs)  # [sampling rows' logits + prompt-logprob rows, vocab]
            if spans := prompt_spans(out):  # the rows after the sampling rows
                n = logits.shape[0] - sum(s.count for s in spans)
                record(spans, logits[n:])
                logits = logits[:n]
            t3 = time.perf_counter()
            sampled = self.sampler.sample(out, rows, logits) if rows else []
        except Exception as e:  # the step's requests fail; the engine goes on
            log.exception("step failed")
            for seq in scheduled:
                self._fail(seq, e)
            return self._take()
        t4 = time.perf_counter()
        produced = self._emit(out, rows, sampled)
        if self.observers:
            stats = self._step_stats(out, produced, (t0, t1, t2, t3, t4))
            for o in self.observers:
                o.on_step(stats)
        return self._take()

    def abort_all(self, error: Exception | None = None) -> Outputs:
        """Stopping (every request is aborted) or crashed (every request fails with ``error``):
        nobody waits forever."""
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if error is None:
                self.scheduler.finish(seq, "abort")
                self._retire(seq)
            else:
                self._fail(seq, error)
        return self._take()

    # ---- inside a step ----------------------------------------------------------------------

    def _reap(self, now: float) -> None:
        """Aborted requests leave (their KV room is free for this step); then the policies rule."""
        for seq, entry in list(self._entries.items()):
            if entry.cancelled.is_set():
                self.scheduler.finish(seq, "abort")
                self._retire(seq, now)
        for policy in self.policies:  # each sees what the ones before it left (and no cancelled request)
            live = [(seq, e.request) for seq, e in self._entries.items() if not e.cancelled.is_set()]
            for seq, error in policy.before_step(live, now):
                self._fail(seq, error, now)

    def _emit(self, out: SchedulerOutput, rows: list[Sequence], sampled: list[list[TokenEvent]]) -> int:
        """Record the step; deliver each row's kept tokens (a stop may cut a row's run short).
        Returns how many tokens were delivered."""
        before = [seq.num_output_tokens for seq in rows]
        finished = self.scheduler.update(out, [[e.token_id for e in events] for events in sampled])
        now, produced = time.monotonic(), 0
        for seq, n0, events in zip(rows, before, sampled, strict=True):
            entry = self._entries[seq]
            if seq.first_token_time is None:
                seq.first_token_time = now
                facts = self.scheduler.request_facts(seq)
                if seq.prompt_logprobs is not None:
                    facts = dataclasses.replace(facts or RequestFacts(), prompt_logprobs=tuple(seq.prompt_logprobs))
                if facts is not None:
                    self._outputs.append((entry, facts))
            kept = seq.num_output_tokens - n0
            for j, event in enumerate(events[:kept]):
                last = j == kept - 1 and seq.finish_reason is not None
                self._outputs.append((entry, dataclasses.replace(event, finish_reason=seq.finish_reason)
                                      if last else event))
            produced += kept
        self.num_generated_tokens += produced
        for seq in finished:
            self._retire(seq, now)
        return produced

    def _fail(self, seq: Sequence, error: Exception, now: float | None = None) -> None:
        self.scheduler.finish(seq, "error")  # out of waiting or running; its KV room is freed now
        self._outputs.append((self._entries[seq], error))
        self._retire(seq, now)

    def _retire(self, seq: Sequence, now: float | None = None) -> None:
        """A finished sequence: its client gets DONE, the observers its numbers."""
        seq.finish_time = time.monotonic() if now is None else now
        self._outputs.append((self._entries.pop(seq), DONE))
        stats = RequestStats(seq.request_id, seq.arrival_time, seq.first_token_time, seq.finish_time,
                             seq.num_prompt_tokens, seq.num_output_tokens, seq.finish_reason or "abort",
                             seq.first_scheduled_time)
        for o in self.observers:
            o.on_request_finished(stats)

    def _take(self) -> Outputs:
        outputs, self._outputs = self._outputs, []
        return outputs

    def _step_stats(self, out: SchedulerOutput, sampled: int, t: tuple[float, ...]) -> StepStats:
        s = self.scheduler.stats()
        return StepStats(
            time=time.monotonic(), num_decode_seqs=len(out.decodes), num_prefill_seqs=len(out.prefills),
            num_prefill_tokens=out.num_prefill_tokens, num_sampled=sampled, num_running=s.num_running,
            num_waiting=s.num_waiting, kv_slots_used=s.kv_slots_used, kv_slots_total=s.kv_slots_total,
            schedule_s=t[1] - t[0], prepare_s=t[2] - t[1], model_s=t[3] - t[2], sample_s=t[4] - t[3],
            step_s=time.perf_counter() - t[0],
            scheduled=(*((q.request_id, 1) for q in out.decodes),
                       *((c.seq.request_id, c.num_tokens) for c in out.prefills)))
