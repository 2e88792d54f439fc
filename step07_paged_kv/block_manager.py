"""The block manager: a pool of fixed-size KV blocks, block tables, and the prefix cache.

Central rule: a block is either FREE (on ``free_block_ids``, content worthless), IN USE
(``ref_count > 0``, listed in the block tables of ``ref_count`` sequences), or CACHED-FREE
(``ref_count == 0`` but its full content is still findable by hash in ``cached_blocks``, kept in
``evictable`` in least-recently-freed order). New blocks come from ``free_block_ids`` first; only
when that is empty is the least recently freed cached block evicted and reused.

Prefix caching: a FULL block is named by a hash of its tokens chained to the hash of the block
before it, so equal hashes mean equal whole prefixes (not merely equal 16 tokens). A new sequence
whose leading full blocks are in the cache shares them (``ref_count += 1``) and skips computing
them. A block is registered only once its K/V are written (:meth:`BlockManager.cache_full_blocks`,
called after the step that computed it). Blocks that are not full are never shared, so a sequence
only ever writes into blocks it owns alone.

vLLM's vocabulary (``can_allocate`` / ``allocate`` / ``append_slots`` / ``free``); results are small
named dataclasses, never magic numbers. Left out: swapping to host memory, per-layer-group block
tables (sliding-window layers keep their old blocks: see the package docstring), cache salting.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import struct
from typing import Protocol, Sequence


class BlockOwner(Protocol):
    """What the block manager needs from a sequence: its block table (which it edits) and tokens."""

    block_table: list[int]

    def token_ids(self, start: int, end: int) -> Sequence[int]: ...


@dataclasses.dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and computed (prefix caching on)


@dataclasses.dataclass(frozen=True, slots=True)
class PrefixHit:
    """The leading full blocks of a token sequence found in the cache (read-only lookup)."""

    block_ids: tuple[int, ...]
    num_evictable: int  # of those, how many are cached-free: taking them uses up free blocks
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.block_ids) * self.block_size


@dataclasses.dataclass(frozen=True, slots=True)
class Allocation:
    """What :meth:`BlockManager.allocate` did for a sequence."""

    num_cached_tokens: int  # leading tokens whose K/V were already cached: skip them in prefill
    num_new_blocks: int  # blocks taken from the free pool (cached hits not counted)


def hash_block(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """SHA-256 of the parent block's hash and this block's token ids: names the whole prefix."""
    return hashlib.sha256((parent or b"") + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.block_size, self.enable_prefix_caching = block_size, enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: collections.deque[int] = collections.deque(range(num_blocks))
        self.cached_blocks: dict[bytes, int] = {}  # block hash -> block id (in use or cached-free)
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first

    # ---- accounting ----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: the free ones plus the cached-free ones (by eviction)."""
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache lookup -------------------------------------------------------------

    def find_cached_prefix(self, seq: BlockOwner, max_tokens: int) -> PrefixHit:
        """The longest run of leading full blocks of ``seq``'s first ``max_tokens`` tokens in the cache."""
        ids: list[int] = []
        evictable, parent = 0, None
        if self.enable_prefix_caching:
            for i in range(max_tokens // self.block_size):
                parent = hash_block(parent, seq.token_ids(i * self.block_size, (i + 1) * self.block_size))
                block_id = self.cached_blocks.get(parent)
                if block_id is None:
                    break
                ids.append(block_id)
                evictable += self.blocks[block_id].ref_count == 0
        return PrefixHit(tuple(ids), evictable, self.block_size)

    # ---- a sequence's blocks ---------------------------------------------------------------

    def can_allocate(self, hit: PrefixHit, num_tokens: int, reserve: int = 0) -> bool:
        """Room for a new sequence's first ``num_tokens`` positions, reusing ``hit``, leaving
        ``reserve`` blocks free (a watermark, so running sequences can still grow)."""
        new = max(self.blocks_needed(num_tokens) - len(hit.block_ids), 0)
        return new + hit.num_evictable + reserve <= self.num_free_blocks

    def allocate(self, seq: BlockOwner, hit: PrefixHit, num_tokens: int) -> Allocation:
        """Give ``seq`` (with an empty block table) the cached blocks of ``hit``, then new blocks
        up to ``num_tokens`` positions. Check :meth:`can_allocate` first."""
        if seq.block_table:
            raise ValueError("seq: already has blocks; free it first")
        if not self.can_allocate(hit, num_tokens):
            raise RuntimeError(f"out of blocks: {num_tokens} tokens, {self.num_free_blocks} free blocks")
        for block_id in hit.block_ids:
            self._take(block_id)
            seq.block_table.append(block_id)
        before = len(seq.block_table)
        self.append_slots(seq, num_tokens)
        return Allocation(hit.num_tokens, len(seq.block_table) - before)

    def can_append_slots(self, seq: BlockOwner, num_tokens: int) -> bool:
        """Room for ``seq``'s table to cover ``num_tokens`` positions in all."""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def append_slots(self, seq: BlockOwner, num_tokens: int) -> None:
        """Grow ``seq``'s block table until it covers ``num_tokens`` positions (a no-op if it does)."""
        if not self.can_append_slots(seq, num_tokens):
            raise RuntimeError(f"out of blocks: {num_tokens} tokens, {self.num_free_blocks} free blocks")
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._new_block())

    def append_slot(self, seq: BlockOwner, num_tokens: int) -> None:
        """One decode token more: ``append_slots`` with the sequence's new length."""
        self.append_slots(seq, num_tokens)

    def cache_full_blocks(self, seq: BlockOwner, num_computed_tokens: int) -> None:
        """Register ``seq``'s blocks that are full and computed under their chained hash."""
        if not self.enable_prefix_caching:
            return
        table, bs = seq.block_table, self.block_size
        full = start = min(num_computed_tokens // bs, len(table))
        while start > 0 and self.blocks[table[start - 1]].block_hash is None:  # hashed blocks lead
            start -= 1
        parent = self.blocks[table[start - 1]].block_hash if start else None
        for i in range(start, full):
            block = self.blocks[table[i]]
            block.block_hash = parent = hash_block(parent, seq.token_ids(i * bs, (i + 1) * bs))
            self.cached_blocks.setdefault(parent, block.block_id)  # a twin computed alongside may be first

    def free(self, seq: BlockOwner) -> None:
        """Release ``seq``'s blocks, last first: a block nobody uses stays cached (evictable,
        the sequence's tail evicted before its head) if registered, else goes back to the free list."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()

    def truncate(self, seq: BlockOwner, num_tokens: int) -> None:
        """Release the blocks of ``seq``'s table past its first ``num_tokens`` positions (step 09
        gives back the room of rejected speculative tokens this way)."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    # ---- internals -----------------------------------------------------------------------------

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.block_hash is not None and self.cached_blocks.get(block.block_hash) == block_id:
            self.evictable[block_id] = None
        else:
            block.block_hash = None
            self.free_block_ids.append(block_id)

    def _take(self, block_id: int) -> None:
        """Share a cached block: one more reference (out of the evictable set if it was free)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]
        block.ref_count += 1

    def _new_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:  # evict the least recently freed cached block
            block_id, _ = self.evictable.popitem(last=False)
            del self.cached_blocks[self.blocks[block_id].block_hash]
        block = self.blocks[block_id]
        block.ref_count, block.block_hash = 1, None
        return block_id
