"""``PagedEngine``: step 06's engine (step 04's loop, step 05's metrics, step 06's admission and
deadlines) with the paged runner, scheduler and sequences plugged in.

Nothing of the loop changes: the engine overrides step 04's factory hooks (``_build_runner``,
``_build_scheduler``, ``_new_sequence``, ``_token_event``) and reports KV usage in blocks. Every
token event carries the request's ``num_cached_tokens`` (prompt tokens found in the prefix
cache), which the API reports as ``usage.prompt_tokens_details.cached_tokens``.

KV accounting, kept on the engine thread after every step and read by ``stats()`` (``/health``):
reserved slots are the used blocks times the block size; wasted slots are the reserved positions
no token fills, i.e. the unfilled tail of each running sequence's last block (shared blocks are
always full). ``kv_waste_mean`` averages over steps since start-up (reserved-weighted), which is
how the README's waste figure is measured; ``kv_tokens_per_seq_mean`` gives step 04's figure for
the same sequences: each would have reserved a whole ``max_len`` row.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from shared.engine import GenerationRequest, TokenEvent
from shared.models import LoadedModel
from shared.sampling import make_generator
from step06_backpressure.engine import BackpressureEngine
from step04_kvcache.model_runner import ModelRunner
from step04_kvcache.observer import StepStats
from step04_kvcache.scheduler import Scheduler, SchedulerOutput
from step04_kvcache.sequence import Sequence
from step07_paged_kv.block_manager import BlockManager
from step07_paged_kv.metrics import PagedKVCollector
from step07_paged_kv.model_runner import PagedCacheConfig, PagedModelRunner
from step07_paged_kv.scheduler import PagedScheduler
from step07_paged_kv.sequence import PagedSequence


@dataclasses.dataclass(slots=True)
class KVAccounting:
    """Sums over steps (engine thread only writes; ``stats()`` reads ints and floats)."""

    steps: int = 0
    reserved_slots: int = 0  # sum over steps of used blocks x block size
    wasted_slots: int = 0  # sum over steps of reserved positions holding no token
    seq_steps: int = 0  # sum over steps of running sequences
    seq_tokens: int = 0  # sum over steps of the tokens cached per running sequence
    waste_now: float = 0.0
    running_max: int = 0

    def record(self, running: list[PagedSequence], used_blocks: int, block_size: int) -> None:
        reserved = used_blocks * block_size
        tokens = sum(s.num_computed_tokens for s in running)
        wasted = sum(len(s.block_table) * block_size - s.num_computed_tokens for s in running)
        self.steps += 1
        self.reserved_slots += reserved
        self.wasted_slots += wasted
        self.seq_steps += len(running)
        self.seq_tokens += tokens
        self.waste_now = wasted / reserved if reserved else 0.0
        self.running_max = max(self.running_max, len(running))


class PagedEngine(BackpressureEngine):
    def __init__(self, *args: Any, cache: PagedCacheConfig = PagedCacheConfig(), **kwargs: Any) -> None:
        """Step 06's engine arguments, plus the paged cache's settings."""
        super().__init__(*args, **kwargs)
        self.cache_cfg = cache
        self.kv_accounting = KVAccounting()
        self.registry.register(PagedKVCollector(self.stats))  # step 05's /metrics

    # ---- step 04's hooks ----------------------------------------------------------------------

    def _build_runner(self, lm: LoadedModel, explicit_len: bool) -> ModelRunner:
        return PagedModelRunner.build(lm, self.runner_cfg, self.cache_cfg, explicit_len)

    def _build_scheduler(self, runner: ModelRunner, lm: LoadedModel) -> Scheduler:
        blocks = BlockManager(runner.cache.num_blocks, runner.cache.block_size, self.cache_cfg.enable_prefix_caching)
        return PagedScheduler(self.sched_cfg, runner.max_len, lm.eos_token_ids, blocks)

    def _new_sequence(self, r: GenerationRequest) -> Sequence:
        return PagedSequence(r.request_id, r.prompt_token_ids, r.params, r.arrival_time,
                             make_generator(r.params, self.runner.device))

    def _token_event(self, seq: PagedSequence, logprob: Any, top_logprobs: Any) -> TokenEvent:
        event = super()._token_event(seq, logprob, top_logprobs)
        return dataclasses.replace(event, num_cached_tokens=seq.num_cached_tokens)

    def _step_stats(self, out: SchedulerOutput, sampled: int, t: tuple[float, ...]) -> StepStats:
        bm = self.scheduler.block_manager
        self.kv_accounting.record(self.scheduler.running, bm.num_used_blocks, bm.block_size)
        stats = super()._step_stats(out, sampled, t)  # kv_slots_used is already in blocks
        return dataclasses.replace(stats, kv_slots_total=bm.num_blocks)

    # ---- anywhere -------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Step 04's counters with KV usage in blocks, plus preemptions, prefix cache and waste."""
        out = super().stats()
        s = self.scheduler
        if s is None:
            return out
        bm, acc = s.block_manager, self.kv_accounting
        queries = s.prefix_cache_queries
        return {**out, "kv_slots_total": bm.num_blocks, "kv_usage": s.num_used_slots / bm.num_blocks,
                "kv_block_size": bm.block_size, "kv_waste": acc.waste_now,
                "kv_waste_mean": acc.wasted_slots / acc.reserved_slots if acc.reserved_slots else 0.0,
                "kv_tokens_per_seq_mean": acc.seq_tokens / acc.seq_steps if acc.seq_steps else 0.0,
                "num_running_max": acc.running_max, "num_preemptions": s.num_preemptions,
                "prefix_cache_queries": queries, "prefix_cache_hits": s.prefix_cache_hits,
                "prefix_cache_hit_rate": s.prefix_cache_hits / queries if queries else 0.0}
