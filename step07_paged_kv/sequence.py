"""A sequence with a block table instead of a cache row.

Step 04's :class:`Sequence` plus what paging needs: ``block_table`` (the pool blocks that hold its
tokens, in order; edited only by the block manager), ``num_cached_tokens`` (prompt tokens its first
admission found in the prefix cache, reported in usage) and ``num_preemptions``.

After a preemption the sequence is recomputed: its cache is dropped and, when it is admitted
again, prompt AND already generated tokens are prefilled again (except the last generated token,
which the next decode feeds as usual). So "prefilling" now means "fewer than
``prefill_target`` tokens cached", not "fewer than the prompt".
"""
from __future__ import annotations

import dataclasses
from typing import Sequence as Seq

from step04_kvcache.sequence import Sequence


@dataclasses.dataclass(eq=False, slots=True)
class PagedSequence(Sequence):
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_cached_tokens: int | None = None  # set at the first admission
    num_preemptions: int = 0

    @property
    def prefill_target(self) -> int:
        """Tokens to cache before decoding: the prompt, or after a preemption all but the last token."""
        return self.num_tokens - 1 if self.output_token_ids else self.num_prompt_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prefill_target

    def token_ids(self, start: int, end: int) -> Seq[int]:
        """Tokens ``start:end`` of prompt + output, without building the whole list."""
        n = self.num_prompt_tokens
        if end <= n:
            return self.prompt_token_ids[start:end]
        return [*self.prompt_token_ids[start:n], *self.output_token_ids[max(start - n, 0):end - n]]
