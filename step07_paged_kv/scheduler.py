"""Step 04's scheduler, with blocks instead of rows: allocate on demand, reuse cached prefixes, preempt.

Central rule: every step, each running sequence first gets room for its next token (oldest first);
when the pool has no free block, the NEWEST running sequence is preempted (its blocks freed, its
tokens recomputed later), until the older ones fit. Then prompt chunks get what is left of the
token budget and of the pool. A waiting sequence is admitted (first come first served, preempted
ones first) only if its first chunk fits while leaving a watermark of free blocks, and it starts
after the longest run of its leading full blocks already in the prefix cache.

What changed from step 04's :class:`Scheduler`: ``schedule`` (blocks, preemption, prefix hits),
``update`` (register newly full blocks in the prefix cache), ``release`` (what ``finish`` gives back
for a running sequence: its blocks, not a row).
``max_seqs`` now only caps the batch; memory is bounded by the pool, in blocks.
"""
from __future__ import annotations

import dataclasses

from step04_kvcache.scheduler import PrefillChunk, Scheduler, SchedulerConfig, SchedulerOutput
from step04_kvcache.sequence import SequenceStatus
from step07_paged_kv.block_manager import BlockManager
from step07_paged_kv.sequence import PagedSequence

WATERMARK = 0.01  # vLLM's: admission leaves 1% of the pool free, so running sequences can grow


@dataclasses.dataclass(frozen=True, slots=True)
class PagedPrefillChunk(PrefillChunk):
    @property
    def samples(self) -> bool:
        """Ends the prompt of a sequence that has no token yet (a recomputation samples nothing:
        its next token comes from the decode of its last generated token)."""
        seq = self.seq
        return not seq.output_token_ids and self.start + self.num_tokens == seq.prefill_target


class PagedScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, max_len: int, eos_token_ids: tuple[int, ...],
                 block_manager: BlockManager) -> None:
        super().__init__(config, max_len, eos_token_ids)
        self.free_slots = []  # step 04's rows: unused here
        self.block_manager = block_manager
        self.watermark_blocks = max(1, int(WATERMARK * block_manager.num_blocks))
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up at first admission
        self.prefix_cache_hits = 0  # of those, found in the cache (skipped in prefill)

    @property
    def num_used_slots(self) -> int:
        return self.block_manager.num_used_blocks

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: set[PagedSequence] = set()
        decodes = []
        for seq in list(self.running):  # oldest first; preemption takes the newest
            if seq.status is SequenceStatus.RUNNING and not seq.is_prefilling and \
                    self._make_room(seq, seq.num_computed_tokens + 1, scheduled):
                decodes.append(seq)
                scheduled.add(seq)
        budget -= len(decodes)
        prefills: list[PrefillChunk] = []
        for seq in list(self.running):  # a partly prefilled sequence was admitted before any waiting one
            if budget > 0 and seq.status is SequenceStatus.RUNNING and seq.is_prefilling:
                chunk = self._grow_prefill(seq, budget, scheduled)
                if chunk is not None:
                    prefills.append(chunk)
                    scheduled.add(seq)
                    budget -= chunk.num_tokens
        while budget > 0 and self.waiting and len(self.running) < self.config.max_seqs:
            chunk = self._admit(self.waiting[0], budget)
            if chunk is None:
                break
            prefills.append(chunk)
            budget -= chunk.num_tokens
        return SchedulerOutput(tuple(decodes), tuple(prefills))

    def _make_room(self, seq: PagedSequence, num_tokens: int, scheduled: set[PagedSequence]) -> bool:
        """Grow ``seq``'s table to ``num_tokens`` positions, preempting the newest running
        sequences while blocks are short. False if ``seq`` itself was preempted, or if the newest
        already runs this step (then ``seq`` waits a step; the pool frees up as others finish)."""
        bm = self.block_manager
        while not bm.can_append_slots(seq, num_tokens):
            victim = self.running[-1]
            if victim in scheduled:
                return False
            self.preempt(victim)
            if victim is seq:
                return False
        bm.append_slots(seq, num_tokens)
        return True

    def _room(self, seq: PagedSequence) -> int:
        """Positions ``seq`` can cover without preempting anyone."""
        bm = self.block_manager
        return (len(seq.block_table) + bm.num_free_blocks) * bm.block_size - seq.num_computed_tokens

    def _grow_prefill(self, seq: PagedSequence, budget: int, scheduled: set[PagedSequence]) -> PrefillChunk | None:
        start = seq.num_computed_tokens
        if not self._make_room(seq, start + 1, scheduled):  # at least one token, preempting if need be
            return None
        n = min(seq.prefill_target - start, budget, self._room(seq))
        self.block_manager.append_slots(seq, start + n)
        return PagedPrefillChunk(seq, start, n)

    def _admit(self, seq: PagedSequence, budget: int) -> PrefillChunk | None:
        """Admit the head of ``waiting`` if its first chunk fits above the watermark."""
        bm = self.block_manager
        target = seq.prefill_target
        hit = bm.find_cached_prefix(seq, target - 1)  # at least one token left to compute
        fit = (bm.num_free_blocks - hit.num_evictable - self.watermark_blocks) * bm.block_size
        n = min(target - hit.num_tokens, budget, fit)
        if n < 1 or not bm.can_allocate(hit, hit.num_tokens + n, reserve=self.watermark_blocks):
            return None
        allocation = bm.allocate(seq, hit, hit.num_tokens + n)
        seq.num_computed_tokens = allocation.num_cached_tokens
        if seq.num_cached_tokens is None:  # the first admission is what the client asked for
            seq.num_cached_tokens = allocation.num_cached_tokens
            self.prefix_cache_queries += seq.num_prompt_tokens
            self.prefix_cache_hits += allocation.num_cached_tokens
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return PagedPrefillChunk(seq, allocation.num_cached_tokens, n)

    def preempt(self, seq: PagedSequence) -> None:
        """Recompute mode: drop ``seq``'s cache (full blocks stay in the prefix cache) and put it
        back at the head of ``waiting``; it keeps its generated tokens."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, out: SchedulerOutput, token_ids: list[int]) -> list[PagedSequence]:
        finished = super().update(out, token_ids)
        for seq in [*out.decodes, *(c.seq for c in out.prefills)]:
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
        return finished

    def release(self, seq: PagedSequence) -> None:  # type: ignore[override]
        """A finished sequence's computed full blocks stay cached; its blocks go back to the pool."""
        self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
        self.block_manager.free(seq)
