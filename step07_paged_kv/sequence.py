"""A sequence whose block table lists blocks of the shared pool, and that may be preempted.

Step 04's :class:`Sequence` (whose ``block_table`` now lists pool blocks, in order, edited only
by the block manager) plus what paging adds: ``num_cached_tokens`` (prompt tokens its first
admission found in the prefix cache, reported in usage) and ``num_preemptions``.

After a preemption the sequence is recomputed: its cache is dropped and, when it is admitted
again, prompt AND already generated tokens are prefilled again (except the last generated token,
which the next decode feeds as usual). So "prefilling" now means "fewer than
``prefill_target`` tokens cached", not "fewer than the prompt".
"""
from __future__ import annotations

import dataclasses

from step04_kvcache.sequence import Sequence


@dataclasses.dataclass(eq=False, slots=True)
class PagedSequence(Sequence):
    num_cached_tokens: int | None = None  # set at the first admission
    num_preemptions: int = 0

    @property
    def prefill_target(self) -> int:
        """Tokens to cache before decoding: the prompt, or after a preemption all but the last token."""
        return self.num_tokens - 1 if self.output_token_ids else self.num_prompt_tokens
