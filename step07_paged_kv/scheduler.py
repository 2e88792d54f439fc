"""Step 04's scheduler, with blocks instead of rows: allocate on demand, reuse cached prefixes, preempt.

Central rule: every step, each running sequence first gets room for its next token (oldest first);
when the pool has no free block, the NEWEST running sequence is preempted (its blocks freed, its
tokens recomputed later), until the older ones fit. Then prompt chunks get what is left of the
token budget and of the pool. A waiting sequence is admitted (first come first served, preempted
ones first) only if its first chunk fits while leaving a watermark of free blocks, and it starts
after the longest run of its leading full blocks already in the prefix cache.

What changed from step 04's :class:`ContiguousScheduler` (both are step 04's :class:`Scheduler`,
which keeps the queues, ``update`` and ``finish``): ``schedule`` (blocks, preemption, prefix hits),
``update`` (register newly full blocks in the prefix cache, and account for KV waste),
``release`` (what ``finish`` gives back for a running sequence: its blocks, not a row), ``stats``
and ``request_facts`` (the prompt tokens a request found cached, for its usage).
``max_seqs`` now only caps the batch; memory is bounded by the pool, in blocks.
"""
from __future__ import annotations

import dataclasses

from shared.engine import RequestFacts
from step04_kvcache.scheduler import PrefillChunk, Scheduler, SchedulerConfig, SchedulerOutput, SchedulerStats
from step04_kvcache.sequence import SequenceStatus
from step07_paged_kv.block_manager import BlockManager
from step07_paged_kv.kv_accounting import KVAccounting
from step07_paged_kv.sequence import PagedSequence

WATERMARK = 0.01  # vLLM's: admission leaves 1% of the pool free, so running sequences can grow


@dataclasses.dataclass(frozen=True, slots=True)
class PagedSchedulerStats(SchedulerStats):
    kv_blocks_used: int
    kv_blocks_total: int
    kv_block_size: int
    kv_waste: float  # reserved slots no token fills, now (the unfilled tails of last blocks)
    kv_waste_mean: float  # the same, over every step since start-up (reserved-weighted)
    kv_tokens_per_seq_mean: float  # cached tokens per running sequence (step 04 reserves max_len each)
    num_running_max: int
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up at first admission
    prefix_cache_hits: int  # of those, found in the cache (skipped in prefill)
    prefix_cache_hit_rate: float


class PagedScheduler(Scheduler):
    sequence_class = PagedSequence

    def __init__(self, config: SchedulerConfig, max_len: int, eos_token_ids: tuple[int, ...],
                 block_manager: BlockManager) -> None:
        super().__init__(config, max_len, eos_token_ids)
        self.block_manager = block_manager
        self.kv_accounting = KVAccounting()
        self.watermark_blocks = max(1, int(WATERMARK * block_manager.num_blocks))
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up at first admission
        self.prefix_cache_hits = 0  # of those, found in the cache (skipped in prefill)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: set[PagedSequence] = set()
        decodes = []
        for seq in list(self.running):  # oldest first; preemption takes the newest
            if seq.status is SequenceStatus.RUNNING and not seq.is_prefilling and \
                    self._make_room(seq, seq.num_computed_tokens + 1 + self.num_lookahead_tokens(seq), scheduled):
                decodes.append(seq)
                scheduled.add(seq)
        budget -= sum(1 + self.num_lookahead_tokens(s) for s in decodes)
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

    def num_lookahead_tokens(self, seq: PagedSequence) -> int:
        """Slots a decode needs past its next token this step: none here (step 09's speculative
        tokens; vLLM's name). Asked once before the room is made and once for the budget."""
        return 0

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
        return PrefillChunk.of(seq, start, n)

    def _admit(self, seq: PagedSequence, budget: int) -> PrefillChunk | None:
        """Admit the head of ``waiting`` if its first chunk fits above the watermark."""
        bm = self.block_manager
        target = seq.prefill_target
        # At least one token left to compute; none reused where prompt logprobs need every position.
        wants_all = seq.prompt_logprobs is not None and not seq.output_token_ids
        hit = bm.find_cached_prefix(seq, 0 if wants_all else target - 1)
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
        return PrefillChunk.of(seq, allocation.num_cached_tokens, n)

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
        for seq in out.scheduled_seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
        self.kv_accounting.record(self.running, self.block_manager.num_used_blocks, self.block_manager.block_size)
        return finished

    def release(self, seq: PagedSequence) -> None:
        """A finished sequence's computed full blocks stay cached; its blocks go back to the pool."""
        self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
        self.block_manager.free(seq)

    def request_facts(self, seq: PagedSequence) -> RequestFacts:
        return RequestFacts(num_cached_tokens=seq.num_cached_tokens or 0)

    def stats(self) -> PagedSchedulerStats:
        bm, acc = self.block_manager, self.kv_accounting
        used, bs, queries = bm.num_used_blocks, bm.block_size, self.prefix_cache_queries
        return PagedSchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting), kv_slots_used=used * bs,
            kv_slots_total=bm.num_blocks * bs, kv_usage=used / bm.num_blocks, kv_blocks_used=used,
            kv_blocks_total=bm.num_blocks, kv_block_size=bs, kv_waste=acc.waste_now, kv_waste_mean=acc.waste_mean,
            kv_tokens_per_seq_mean=acc.tokens_per_seq_mean, num_running_max=acc.running_max,
            num_preemptions=self.num_preemptions, prefix_cache_queries=queries,
            prefix_cache_hits=self.prefix_cache_hits,
            prefix_cache_hit_rate=self.prefix_cache_hits / queries if queries else 0.0)
