"""How much of the reserved KV memory holds tokens: the paged cache's headline figure.

Kept by the scheduler after every step (engine thread only writes; ``stats()`` reads ints and
floats). Reserved slots are the used blocks times the block size; wasted slots are the reserved
positions no token fills, i.e. the unfilled tail of each running sequence's last block (shared
blocks are always full). ``waste_mean`` averages over steps since start-up (reserved-weighted),
which is how the README's waste figure is measured; ``tokens_per_seq_mean`` gives step 04's figure
for the same sequences: each would have reserved a whole ``max_len`` row.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence as Seq

from step04_kvcache.sequence import Sequence


@dataclasses.dataclass(slots=True)
class KVAccounting:
    steps: int = 0
    reserved_slots: int = 0  # sum over steps of used blocks x block size
    wasted_slots: int = 0  # sum over steps of reserved positions holding no token
    seq_steps: int = 0  # sum over steps of running sequences
    seq_tokens: int = 0  # sum over steps of the tokens cached per running sequence
    waste_now: float = 0.0
    running_max: int = 0

    def record(self, running: Seq[Sequence], used_blocks: int, block_size: int) -> None:
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

    @property
    def waste_mean(self) -> float:
        return self.wasted_slots / self.reserved_slots if self.reserved_slots else 0.0

    @property
    def tokens_per_seq_mean(self) -> float:
        return self.seq_tokens / self.seq_steps if self.seq_steps else 0.0
