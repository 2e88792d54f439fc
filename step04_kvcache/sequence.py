"""A request as the scheduler sees it: tokens, progress through the prompt, and a cache row.

vLLM's vocabulary. A :class:`Sequence` is WAITING (no cache row yet), RUNNING (owns a row of the
contiguous KV cache: ``slot``) or FINISHED. ``num_computed_tokens`` counts the tokens whose keys
and values are already in its row; the rest are what the next step must feed:

* prefilling: ``num_computed_tokens < num_prompt_tokens`` (the prompt, possibly in chunks);
* decoding: every token but the last sampled one is cached, so each step feeds exactly one.
"""
from __future__ import annotations

import dataclasses
import enum

import torch

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
    slot: int | None = None  # the KV-cache row it owns while RUNNING
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
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]
