"""The paged KV cache: per layer, one pool of fixed-size blocks that any sequence can use.

Central rule: token ``pos`` of a sequence lives in block ``block_table[pos // block_size]`` at
offset ``pos % block_size``, i.e. at slot ``block_table[pos // block_size] * block_size + pos %
block_size`` of the pool flattened to ``[num_blocks * block_size, Hkv, D]``. Blocks of one sequence
need not be adjacent, and one block may sit in the tables of many sequences (a shared prefix).

It implements ``shared.kv_cache.KVCache`` (``write``, ``slots``, ``gather``), so
``shared.attention.TorchAttentionBackend`` becomes paged attention without a line changed: it
asks ``slots`` for the positions each sequence reads and ``gather``s them. That gather is the plain
torch "paged attention": copy the sequence's scattered blocks into a padded ``[B, L]`` batch, then
one dense attention call. A kernel (step 10) reads the blocks in place instead.
"""
from __future__ import annotations

import dataclasses

import torch

from shared.kv_cache import BlockStorage


@dataclasses.dataclass(frozen=True, slots=True)
class PagedKVCache(BlockStorage):
    """Per layer a pool ``[num_blocks, block_size, num_kv_heads, head_dim]``; ``write`` and
    ``gather`` are ``BlockStorage``'s (the same as the contiguous cache's), only ``slots`` differs."""

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 fill: float = 0.0) -> PagedKVCache:
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size)):
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        new = lambda: torch.full(shape, fill, dtype=dtype, device=device)  # noqa: E731
        return cls(k=tuple(new() for _ in range(num_layers)), v=tuple(new() for _ in range(num_layers)))

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def slots(self, block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``block_tables [B, max_blocks]``, ``positions [B, L]`` -> slots ``[B, L]``."""
        blocks = block_tables.gather(1, positions // self.block_size)  # [B, L]
        return blocks * self.block_size + positions % self.block_size
