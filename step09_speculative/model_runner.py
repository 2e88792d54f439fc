"""Step 04's model runner, verifying: every decode feeds its last token AND its draft tokens.

Central rule: the proposer runs first (vLLM v1's model runner owns its drafter too): each decode
that the scheduler gave lookahead room gets up to that many draft tokens (``spec_token_ids``).
Then ONE forward over the packed batch, as chunked prefill packs several tokens of a sequence:
a decode with ``k`` drafts contributes ``1 + k`` tokens at positions ``n .. n + k`` and gets ``1 + k``
logits rows (the target's distribution after its last token and after each draft); decodes with
no draft contribute one token and one row, as before; prefill chunks follow, unchanged. The
decodes stay first in the batch, so attention still runs them as one padded call
(``decode_query_len``: up to ``1 + k`` queries each).
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence as Seq

import torch

from shared.attention import BatchInputs, build_batch
from step04_kvcache.model_runner import ModelRunner
from step04_kvcache.prompt_logprobs import prompt_spans, span_rows
from step04_kvcache.scheduler import SchedulerOutput
from step07_paged_kv.paged_cache import PagedKVCache
from step09_speculative.scheduler import SpecSequence


class Proposer(Protocol):
    name: str

    def propose_for(self, seqs: Seq[SpecSequence]) -> None:
        """Set each sequence's ``spec_token_ids`` (at most its ``num_lookahead_tokens``) and, for
        sampled draft tokens, ``draft_probs``."""


class SpecModelRunner(ModelRunner[PagedKVCache]):
    def __init__(self, runner: ModelRunner[PagedKVCache], proposer: Proposer | None, num_speculative_tokens: int) -> None:
        super().__init__(runner.model, runner.cache, runner.device, runner.max_len, runner.details)
        self.proposer, self.k = proposer, num_speculative_tokens
        self.details |= {"speculative_method": proposer.name if proposer else "none",
                         "num_speculative_tokens": str(num_speculative_tokens if proposer else 0)}

    def propose(self, decodes: tuple[SpecSequence, ...]) -> None:
        """Fill each decode's ``spec_token_ids`` (at most its ``num_lookahead_tokens``)."""
        todo = [s for s in decodes if s.num_lookahead_tokens > 0]
        if todo and self.proposer is not None:
            self.proposer.propose_for(todo)

    def prepare(self, out: SchedulerOutput) -> BatchInputs:
        self.propose(out.decodes)
        tokens = [[s.last_token_id, *s.spec_token_ids] for s in out.decodes]
        num_decode_tokens = sum(map(len, tokens))
        tokens += [list(c.seq.token_ids(c.start, c.start + c.num_tokens)) for c in out.prefills]
        context = [s.num_computed_tokens for s in out.decodes] + [c.start for c in out.prefills]
        tables = [s.block_table for s in out.scheduled_seqs]
        b = build_batch(tokens, context, tables, self.cache.block_size, self.device, decode_query_len=1 + self.k)
        rows = list(range(num_decode_tokens))  # every decode position: the target's verdict on each draft
        end = num_decode_tokens
        for c in out.prefills:  # a chunk that completes its prompt samples from its last position
            end += c.num_tokens
            if c.samples:
                rows.append(end - 1)
        rows += span_rows(prompt_spans(out, num_decode_tokens))
        return dataclasses.replace(b, logits_indices=torch.tensor(rows, dtype=torch.long, device=self.device))
