"""Step 07's scheduler with room for speculative tokens, given back when they are rejected.

Central rule: the ``n`` decodes of a step share ``--speculative-max-verify-tokens`` (``M``) fed
tokens: each gets KV room and token budget for its next token plus ``k = min(K, M // n - 1)``
proposals (``num_lookahead_tokens``; ``K``: ``--num-speculative-tokens``; fewer near ``max_tokens``,
the context's end or the step's token budget), so a lone sequence verifies ``K`` drafts, two
verify fewer each, and past ``M / 2`` decodes nobody speculates: verifying more rows costs more
on a CPU, and a big batch already fills the matmuls (README). After verification the sequence has cached its fed token and the accepted
drafts; the blocks past them go back to the pool (block-table truncation), so rejected tokens
never hold memory past their step. The draft tokens themselves live on the sequence
(``spec_token_ids``, as in vLLM v1), set by the model runner's proposer each step.

It also counts what speculation did (vLLM's ``spec_decode`` counters): drafts, draft tokens,
accepted tokens, and accepted tokens per draft position.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence as Seq

import torch

from step04_kvcache.scheduler import SchedulerConfig, SchedulerOutput
from step07_paged_kv.block_manager import BlockManager
from step07_paged_kv.scheduler import PagedScheduler, PagedSchedulerStats
from step07_paged_kv.sequence import PagedSequence
from step09_speculative.config import SpeculativeConfig


@dataclasses.dataclass(eq=False, slots=True)
class SpecSequence(PagedSequence):
    num_lookahead_tokens: int = 0  # proposals it may get this step (room reserved by the scheduler)
    spec_token_ids: list[int] = dataclasses.field(default_factory=list)  # this step's draft tokens
    draft_probs: torch.Tensor | None = None  # [len(spec_token_ids), V] when the draft sampled them
    num_drafted: int = 0  # draft tokens verified for it so far, and how many of them were kept
    num_kept: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class SpecSchedulerStats(PagedSchedulerStats):
    spec_decode_num_drafts: int  # (sequence, step) pairs that verified at least one draft token
    spec_decode_num_draft_tokens: int
    spec_decode_num_accepted_tokens: int
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...]  # [k]: drafts accepted at position j
    spec_decode_acceptance_rate: float  # accepted / draft tokens
    spec_decode_mean_acceptance_length: float  # tokens per verified sequence step: 1 + accepted / drafts


class SpecScheduler(PagedScheduler):
    sequence_class = SpecSequence

    def __init__(self, config: SchedulerConfig, max_len: int, eos_token_ids: tuple[int, ...],
                 block_manager: BlockManager, spec: SpeculativeConfig) -> None:
        super().__init__(config, max_len, eos_token_ids, block_manager)
        self.spec = spec
        self._k, self._spec_budget = 0, 0  # this step's drafts per decode, and the tokens left for them
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * spec.k
        self.last_drafts: dict[str, tuple[int, int]] = {}  # request id -> (drafted, accepted) last step

    def schedule(self) -> SchedulerOutput:
        decoding = sum(1 for s in self.running if not s.is_prefilling)
        m, k = self.spec.speculative_max_verify_tokens, self.spec.k
        if self.spec.speculative_method == "none" or not decoding:
            k = 0
        elif m:
            k = min(k, m // decoding - 1)  # may go below 0: nobody speculates
        self._k = k
        self._spec_budget = self.config.max_num_batched_tokens - decoding  # each decode's own token first
        for seq in self.running:
            seq.num_lookahead_tokens = -1  # not yet decided this step
        return super().schedule()

    def num_lookahead_tokens(self, seq: SpecSequence) -> int:
        if seq.num_lookahead_tokens < 0:  # decided once per step, before its room is made
            k = max(0, min(self._k, self._spec_budget,
                           seq.params.max_tokens - seq.num_output_tokens - 1,  # the last emitted token is free
                           self.max_len - seq.num_tokens))  # fed positions end at max_len - 1
            seq.num_lookahead_tokens, self._spec_budget = k, self._spec_budget - k
        return seq.num_lookahead_tokens

    def update(self, out: SchedulerOutput, token_ids: Seq[Seq[int]]) -> list[SpecSequence]:
        self.last_drafts = {}  # a new dict: the engine view reads the last one from another thread
        for seq, tokens in zip(out.decodes, token_ids):  # decodes are the first sampling rows
            if seq.spec_token_ids:
                accepted = len(tokens) - 1
                self.last_drafts[seq.request_id] = (len(seq.spec_token_ids), accepted)
                seq.num_drafted += len(seq.spec_token_ids)
                seq.num_kept += accepted
                self.num_drafts += 1
                self.num_draft_tokens += len(seq.spec_token_ids)
                self.num_accepted_tokens += accepted
                for j in range(accepted):
                    self.accepted_per_pos[j] += 1
            # cached after this step: its fed token and the accepted drafts; the rest's room goes back
            self.block_manager.truncate(seq, seq.num_computed_tokens + len(tokens))
            seq.spec_token_ids, seq.draft_probs, seq.num_lookahead_tokens = [], None, 0
        return super().update(out, token_ids)

    def preempt(self, seq: SpecSequence) -> None:
        seq.spec_token_ids, seq.draft_probs = [], None
        super().preempt(seq)

    def stats(self) -> SpecSchedulerStats:
        base = super().stats()
        drafts, tokens, accepted = self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens
        return SpecSchedulerStats(
            **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
            spec_decode_num_drafts=drafts, spec_decode_num_draft_tokens=tokens,
            spec_decode_num_accepted_tokens=accepted, spec_decode_num_accepted_tokens_per_pos=tuple(self.accepted_per_pos),
            spec_decode_acceptance_rate=accepted / tokens if tokens else 0.0,
            spec_decode_mean_acceptance_length=1 + accepted / drafts if drafts else 0.0)
