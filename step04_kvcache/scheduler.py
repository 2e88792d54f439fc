"""The continuous-batching scheduler: every step, which sequences run and how many tokens each feeds.

Central rule: each step first schedules one decode token for every running sequence that has
finished its prompt, then spends what is left of the ``max_num_batched_tokens`` budget on prompt
tokens, first come first served: the partly prefilled sequence (if any) continues, then waiting
sequences are admitted, each taking a free KV-cache row, while rows and budget last. A prompt
longer than the remaining budget is cut into chunks over several steps (chunked prefill). So a
running decode is never delayed by more than one step's budget of prefill work, and every waiting
request runs once the requests ahead of it have started.

A row, once given, is the sequence's until it finishes or is aborted: the contiguous cache reserves
``max_len`` positions per row, so a running sequence can never run out of room and nothing is
ever preempted. The price is memory (step 07's paged cache reserves only what is used).
"""
from __future__ import annotations

import collections
import dataclasses

from shared.config import flag_field
from shared.sampling import finish_reason
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
    """Prompt tokens ``start : start + num_tokens`` of ``seq``, fed this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk ends the prompt, so its last token's logits give the first output token."""
        return self.start + self.num_tokens == self.seq.num_prompt_tokens


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
    def sampling_seqs(self) -> list[Sequence]:
        """The sequences that produce a token this step, in the order of the logits rows."""
        return [*self.decodes, *(c.seq for c in self.prefills if c.samples)]


class Scheduler:
    def __init__(self, config: SchedulerConfig, max_len: int, eos_token_ids: tuple[int, ...]) -> None:
        self.config = config
        self.max_len = max_len  # positions per cache row
        self.eos_token_ids = eos_token_ids
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order, hence FCFS
        self.free_slots: list[int] = list(range(config.max_seqs - 1, -1, -1))  # pop() gives row 0 first

    @property
    def num_used_slots(self) -> int:
        return self.config.max_seqs - len(self.free_slots)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if not 0 < seq.num_prompt_tokens < self.max_len:
            raise ValueError(f"prompt_token_ids: {seq.num_prompt_tokens} tokens; a KV-cache row holds "
                             f"{self.max_len} positions, so a prompt may have 1 to {self.max_len - 1}")
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        decodes = [s for s in self.running if not s.is_prefilling]
        budget -= len(decodes)  # >= 0: max_seqs <= max_num_batched_tokens
        prefills: list[PrefillChunk] = []
        for seq in self.running:  # a partly prefilled sequence was admitted before any waiting one
            if seq.is_prefilling and budget > 0:
                prefills.append(self._chunk(seq, budget))
                budget -= prefills[-1].num_tokens
        while budget > 0 and self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot, seq.status = self.free_slots.pop(), SequenceStatus.RUNNING
            self.running.append(seq)
            prefills.append(self._chunk(seq, budget))
            budget -= prefills[-1].num_tokens
        return SchedulerOutput(tuple(decodes), tuple(prefills))

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> PrefillChunk:
        start = seq.num_computed_tokens
        return PrefillChunk(seq, start, min(seq.num_prompt_tokens - start, budget))

    def update(self, out: SchedulerOutput, token_ids: list[int]) -> list[Sequence]:
        """Record a step: advance what is cached, append each sampled token, finish who stops."""
        for seq in out.decodes:
            seq.num_computed_tokens += 1
        for chunk in out.prefills:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        finished = []
        for seq, token in zip(out.sampling_seqs, token_ids, strict=True):
            seq.output_token_ids.append(token)
            reason = finish_reason(token, seq.num_output_tokens, seq.params, self.eos_token_ids)
            if reason is None and seq.num_tokens >= self.max_len:
                reason = "length"  # its row is full (the API's max_tokens check normally stops it first)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take ``seq`` out of ``waiting`` or ``running`` and free its row: finished, aborted or failed."""
        if seq.status is SequenceStatus.FINISHED:
            raise ValueError(f"seq: {seq.request_id} already finished ({seq.finish_reason})")
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.release(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def release(self, seq: Sequence) -> None:
        """Give back the cache a running sequence held: here its row (step 07: its blocks)."""
        self.free_slots.append(seq.slot)
        seq.slot = None
