"""A request as the scheduler sees it: tokens, progress through the prompt, and where its KV lives.

vLLM's vocabulary. A :class:`Sequence` is WAITING (nothing cached yet), RUNNING (its keys and
values are in the cache, at the slots its ``block_table`` names) or FINISHED.
``num_computed_tokens`` counts the tokens whose keys and values are already cached; the rest are
what the next step must feed:

* prefilling: ``num_computed_tokens < prefill_target`` (the prompt, possibly in chunks);
* decoding: every token but the last sampled one is cached, so each step feeds exactly one.

Here the block table is one entry, the sequence's row of the contiguous cache: a row is one block
of ``max_len`` slots, and attention finds a token's K/V through it like through any block table.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Sequence as Seq

import torch

from shared.engine import PromptLogprob
from shared.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False, slots=True)  # eq=False: identity equality and hashing
class Sequence:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float
    generator: torch.Generator | None = None  # its own random stream when seeded
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = dataclasses.field(default_factory=list)  # edited by the scheduler only
    # per prompt token, filled during prefill when params.prompt_logprobs is set (prompt_logprobs.py)
    prompt_logprobs: list[PromptLogprob | None] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    first_scheduled_time: float | None = None  # the step that first ran it: its queue time ends
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prefill_target(self) -> int:
        """Tokens to cache before the first decode: the prompt."""
        return self.num_prompt_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prefill_target

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    def token_ids(self, start: int, end: int) -> Seq[int]:
        """Tokens ``start:end`` of prompt + output, without building the whole list."""
        n = self.num_prompt_tokens
        if end <= n:
            return self.prompt_token_ids[start:end]
        return [*self.prompt_token_ids[start:n], *self.output_token_ids[max(start - n, 0):end - n]]
