"""The continuous-batching scheduler: every step, which sequences run and how many tokens each feeds.

Central rule: each step first schedules one decode token for every running sequence that has
finished its prompt, then spends what is left of the ``max_num_batched_tokens`` budget on prompt
tokens, first come first served: the partly prefilled sequence (if any) continues, then waiting
sequences are admitted, each taking a free KV-cache row, while rows and budget last. A prompt
longer than the remaining budget is cut into chunks over several steps (chunked prefill). So a
running decode is never delayed by more than one step's budget of prefill work, and every waiting
request runs once the requests ahead of it have started.

:class:`Scheduler` holds what any scheduler here does whatever the cache layout (the ``waiting``
and ``running`` queues, ``update`` after a step, ``finish``); :class:`ContiguousScheduler` adds
step 04's layout: a row, once given, is the sequence's until it finishes or is aborted. The
contiguous cache reserves ``max_len`` slots per row, so a running sequence can never run out of
room and nothing is ever preempted; the price is memory.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence as Seq

import torch

from shared.config import flag_field
from shared.engine import GenerationRequest, RequestFacts
from shared.sampling import finish_reason, make_generator
from step04_kvcache.sequence import Sequence, SequenceStatus


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_seqs: int = flag_field(16, "most sequences running at once; the KV cache holds one row per sequence")
    max_num_batched_tokens: int = flag_field(
        256, "token budget of one step: one token per running decode, the rest for prompt chunks "
        "(bounds how long a prefill can delay running decodes); must be >= --max-seqs")

    def __post_init__(self) -> None:
        if self.max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1, got {self.max_seqs}")
        if self.max_num_batched_tokens < self.max_seqs:
            raise ValueError(f"max_num_batched_tokens must be >= max_seqs ({self.max_seqs}) so that every "
                             f"running sequence decodes every step, got {self.max_num_batched_tokens}")


@dataclasses.dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Tokens ``start : start + num_tokens`` of ``seq`` (its prompt), fed this step. ``samples``:
    the chunk completes what must be cached before decoding, for a sequence with no token yet, so
    its last token's logits give the first output token (fixed when the chunk is made)."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool

    @classmethod
    def of(cls, seq: Sequence, start: int, num_tokens: int) -> PrefillChunk:
        end = start + num_tokens
        return cls(seq, start, num_tokens, samples=not seq.output_token_ids and end == seq.prefill_target)


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """One step's work: decodes first (one token each), then prefill chunks."""

    decodes: tuple[Sequence, ...]
    prefills: tuple[PrefillChunk, ...]

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills)

    @property
    def num_batched_tokens(self) -> int:
        return len(self.decodes) + self.num_prefill_tokens

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def scheduled_seqs(self) -> list[Sequence]:
        """Every sequence that feeds tokens this step, in the order of the batch's rows."""
        return [*self.decodes, *(c.seq for c in self.prefills)]

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """The sequences that produce a token this step, in the order of the logits rows."""
        return [*self.decodes, *(c.seq for c in self.prefills if c.samples)]


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_slots_used: int  # KV positions reserved by running sequences (step 04: whole rows)
    kv_slots_total: int
    kv_usage: float  # used / total


@dataclasses.dataclass(frozen=True, slots=True)
class ContiguousSchedulerStats(SchedulerStats):
    kv_rows_used: int  # one per running sequence
    kv_rows_total: int  # --max-seqs


class Scheduler:
    """What every scheduler here shares, whatever the cache layout. A layout adds ``schedule``
    (who runs, and the KV room it gets), ``release`` (what a running sequence gives back) and
    ``stats``."""

    sequence_class: type[Sequence] = Sequence

    def __init__(self, config: SchedulerConfig, max_len: int, eos_token_ids: tuple[int, ...]) -> None:
        self.config = config
        self.max_len = max_len  # most tokens a sequence may hold
        self.eos_token_ids = eos_token_ids
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order, hence FCFS

    def new_sequence(self, request: GenerationRequest, device: torch.device) -> Sequence:
        r = request
        return self.sequence_class(r.request_id, r.prompt_token_ids, r.params, r.arrival_time,
                                   make_generator(r.params, device))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if not 0 < seq.num_prompt_tokens < self.max_len:
            raise ValueError(f"prompt_token_ids: {seq.num_prompt_tokens} tokens; a sequence holds "
                             f"{self.max_len} positions, so a prompt may have 1 to {self.max_len - 1}")
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        raise NotImplementedError

    def release(self, seq: Sequence) -> None:
        """Give back the KV room a running sequence held."""
        raise NotImplementedError

    def stats(self) -> SchedulerStats:
        raise NotImplementedError

    def request_facts(self, seq: Sequence) -> RequestFacts | None:
        """What the API learns about ``seq`` before its first token (none here: no prefix cache)."""
        return None

    def update(self, out: SchedulerOutput, token_ids: Seq[Seq[int]]) -> list[Sequence]:
        """Record a step: advance what is cached, append each row's sampled tokens, finish who stops.

        ``token_ids[i]``: the tokens sampling row ``i`` produced, one here (step 09's verification
        may accept several: a decode then caches its fed token and the accepted drafts). A token
        that finishes a sequence drops the ones after it."""
        produced = dict(zip(out.sampling_seqs, token_ids, strict=True))
        for seq in out.decodes:
            seq.num_computed_tokens += len(produced[seq])
        for chunk in out.prefills:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        finished = []
        for seq, tokens in produced.items():
            for token in tokens:
                seq.output_token_ids.append(token)
                reason = finish_reason(token, seq.num_output_tokens, seq.params, self.eos_token_ids)
                if reason is None and seq.num_tokens >= self.max_len:
                    reason = "length"  # no room left (the API's max_tokens check normally stops it first)
                if reason is not None:
                    self.finish(seq, reason)
                    finished.append(seq)
                    break
        return finished

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take ``seq`` out of ``waiting`` or ``running`` and free its KV room: finished, aborted or failed."""
        if seq.status is SequenceStatus.FINISHED:
            raise ValueError(f"seq: {seq.request_id} already finished ({seq.finish_reason})")
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.release(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason


class ContiguousScheduler(Scheduler):
    """Step 04's: one row of the contiguous cache per running sequence (its block table ``[row]``)."""

    def __init__(self, config: SchedulerConfig, max_len: int, eos_token_ids: tuple[int, ...]) -> None:
        super().__init__(config, max_len, eos_token_ids)
        self.free_rows: list[int] = list(range(config.max_seqs - 1, -1, -1))  # pop() gives row 0 first

    @property
    def num_used_rows(self) -> int:
        return self.config.max_seqs - len(self.free_rows)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        decodes = [s for s in self.running if not s.is_prefilling]
        budget -= len(decodes)  # >= 0: max_seqs <= max_num_batched_tokens
        prefills: list[PrefillChunk] = []
        for seq in self.running:  # a partly prefilled sequence was admitted before any waiting one
            if seq.is_prefilling and budget > 0:
                prefills.append(self._chunk(seq, budget))
                budget -= prefills[-1].num_tokens
        while budget > 0 and self.waiting and self.free_rows:
            seq = self.waiting.popleft()
            seq.block_table, seq.status = [self.free_rows.pop()], SequenceStatus.RUNNING
            self.running.append(seq)
            prefills.append(self._chunk(seq, budget))
            budget -= prefills[-1].num_tokens
        return SchedulerOutput(tuple(decodes), tuple(prefills))

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> PrefillChunk:
        start = seq.num_computed_tokens
        return PrefillChunk.of(seq, start, min(seq.num_prompt_tokens - start, budget))

    def release(self, seq: Sequence) -> None:
        self.free_rows.append(seq.block_table.pop())

    def stats(self) -> ContiguousSchedulerStats:
        rows, total = self.num_used_rows, self.config.max_seqs
        return ContiguousSchedulerStats(num_running=len(self.running), num_waiting=len(self.waiting),
                              kv_slots_used=rows * self.max_len, kv_slots_total=total * self.max_len,
                              kv_usage=rows / total, kv_rows_used=rows, kv_rows_total=total)
