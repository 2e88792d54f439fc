"""Block manager: allocation, reference counts, hash chains, LRU eviction, no leak under random use."""
from __future__ import annotations

import dataclasses
import random

import pytest

from step07_paged_kv.block_manager import BlockManager, hash_block

BS = 4


@dataclasses.dataclass(eq=False)
class Seq:
    """The block manager's view of a sequence: a block table and tokens."""

    tokens: list[int]
    block_table: list[int] = dataclasses.field(default_factory=list)

    def token_ids(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]


def admit(bm: BlockManager, seq: Seq, num_tokens: int | None = None) -> int:
    """Allocate ``seq`` (all its tokens by default) reusing its cached prefix; cached tokens."""
    n = len(seq.tokens) if num_tokens is None else num_tokens
    hit = bm.find_cached_prefix(seq, n - 1)
    return bm.allocate(seq, hit, n).num_cached_tokens


def check_invariants(bm: BlockManager, live: list[Seq]) -> None:
    refs = [0] * bm.num_blocks
    for s in live:
        for b in s.block_table:
            refs[b] += 1
    assert [b.ref_count for b in bm.blocks] == refs
    free, evictable = set(bm.free_block_ids), set(bm.evictable)
    in_use = {i for i, r in enumerate(refs) if r}
    assert len(free) == len(bm.free_block_ids) and not free & evictable and not (free | evictable) & in_use
    assert len(free) + len(evictable) + len(in_use) == bm.num_blocks
    for h, b in bm.cached_blocks.items():
        assert bm.blocks[b].block_hash == h and b not in free
    assert all(bm.cached_blocks.get(bm.blocks[b].block_hash) == b for b in evictable)


def test_allocate_takes_whole_blocks_and_free_returns_them() -> None:
    bm = BlockManager(8, BS)
    a = Seq(list(range(10)))
    assert admit(bm, a) == 0 and len(a.block_table) == 3  # 10 tokens: 3 blocks, the last one half full
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 3
    bm.append_slot(a, 12)  # still inside the third block
    assert len(a.block_table) == 3
    bm.append_slot(a, 13)
    assert len(a.block_table) == 4 and len(set(a.block_table)) == 4
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 8 and bm.num_used_blocks == 0


def test_can_allocate_refuses_what_does_not_fit_and_allocate_raises() -> None:
    bm = BlockManager(4, BS)
    big = Seq(list(range(17)))  # 5 blocks
    hit = bm.find_cached_prefix(big, 16)
    assert not bm.can_allocate(hit, 17)
    with pytest.raises(RuntimeError, match="out of blocks"):
        bm.allocate(big, hit, 17)
    assert big.block_table == [] and bm.num_free_blocks == 4
    assert bm.can_allocate(hit, 16) and not bm.can_allocate(hit, 16, reserve=1)
    small = Seq(list(range(8)))
    admit(bm, small)
    assert not bm.can_append_slots(small, 8 + 2 * BS + 1) and bm.can_append_slots(small, 8 + 2 * BS)


def test_shared_prefix_blocks_are_reference_counted() -> None:
    bm = BlockManager(16, BS)
    prefix = list(range(100, 112))  # 3 full blocks
    a, b = Seq(prefix + [1, 2]), Seq(prefix + [3, 4, 5])
    admit(bm, a)
    assert admit(bm, b) == 0  # nothing is cached before a's blocks are computed and registered
    bm.free(b)
    bm.cache_full_blocks(a, len(a.tokens))
    assert admit(bm, b) == 12 and b.block_table[:3] == a.block_table[:3]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 2, 1]
    assert b.block_table[3] != a.block_table[3]  # the partial block is never shared
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1, 1] and not bm.evictable
    bm.free(b)
    assert bm.num_used_blocks == 0 and len(bm.evictable) == 3  # cached, free, evictable
    check_invariants(bm, [])


def test_the_last_prompt_token_is_never_a_hit() -> None:
    """A prompt made of cached full blocks still computes its last block: it needs its logits."""
    bm = BlockManager(16, BS)
    a = Seq(list(range(8)))
    admit(bm, a)
    bm.cache_full_blocks(a, 8)
    bm.free(a)
    assert admit(bm, Seq(list(range(8)))) == 4
    assert admit(bm, Seq(list(range(9)))) == 8


def test_block_hashes_chain_on_the_whole_prefix() -> None:
    """The same 4 tokens after different prefixes are different blocks; a lookup stops at the first miss."""
    bm = BlockManager(16, BS)
    a = Seq([1, 2, 3, 4, 9, 9, 9, 9, 5])
    admit(bm, a)
    bm.cache_full_blocks(a, 9)
    h1 = hash_block(None, [1, 2, 3, 4])
    assert bm.blocks[a.block_table[1]].block_hash == hash_block(h1, [9, 9, 9, 9]) != hash_block(None, [9, 9, 9, 9])
    assert bm.find_cached_prefix(Seq([7, 7, 7, 7, 9, 9, 9, 9, 5]), 8).block_ids == ()  # same block, other parent
    assert bm.find_cached_prefix(Seq([1, 2, 3, 4, 8, 9, 9, 9, 5]), 8).block_ids == (a.block_table[0],)
    assert bm.find_cached_prefix(Seq(a.tokens), 8).block_ids == tuple(a.block_table[:2])
    off = BlockManager(16, BS, enable_prefix_caching=False)
    c = Seq(a.tokens)
    admit(off, c)
    off.cache_full_blocks(c, 9)
    assert off.find_cached_prefix(Seq(a.tokens), 8).block_ids == () and not off.cached_blocks


def test_free_cached_blocks_are_evicted_least_recently_freed_first_tail_first() -> None:
    bm = BlockManager(6, BS)
    a, b = Seq(list(range(0, 8)) + [0]), Seq(list(range(50, 58)) + [0])  # 2 full blocks + 1 each
    admit(bm, a)
    admit(bm, b)
    for s in (a, b):
        bm.cache_full_blocks(s, 9)
    a_full, b_full = a.block_table[:2], b.block_table[:2]
    bm.free(a)
    bm.free(b)
    assert list(bm.evictable) == [a_full[1], a_full[0], b_full[1], b_full[0]]
    assert len(bm.free_block_ids) == 2  # the two partial blocks: reused before any cached block
    c = Seq(list(range(100, 112)))  # 3 new blocks: 2 free ones, then evict a's tail block
    admit(bm, c)
    assert c.block_table[2] == a_full[1] and a_full[1] not in bm.evictable
    assert bm.find_cached_prefix(Seq(list(range(8)) + [0]), 8).block_ids == (a_full[0],)  # head still cached
    # A hit revives cached-free blocks (they leave the eviction queue); its new block evicts a's head.
    d = Seq(list(range(50, 58)) + [1])
    assert admit(bm, d) == 8 and d.block_table == [*b_full, a_full[0]] and not bm.evictable
    assert bm.find_cached_prefix(Seq(list(range(8)) + [0]), 8).block_ids == ()
    check_invariants(bm, [c, d])


def test_a_twin_block_computed_alongside_is_not_registered_and_frees_cleanly() -> None:
    bm = BlockManager(8, BS)
    a, b = Seq(list(range(9))), Seq(list(range(9)))
    admit(bm, a)
    admit(bm, b)  # both before either is computed: no sharing
    bm.cache_full_blocks(a, 9)
    bm.cache_full_blocks(b, 9)
    assert bm.cached_blocks[bm.blocks[a.block_table[1]].block_hash] == a.block_table[1]
    bm.free(b)
    bm.free(a)
    check_invariants(bm, [])
    assert len(bm.evictable) == 2 and bm.num_free_blocks == 8


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_no_block_leaks_after_1000_random_operations(prefix_caching: bool) -> None:
    rng = random.Random(f"leak-{prefix_caching}")
    bm = BlockManager(40, BS, enable_prefix_caching=prefix_caching)
    prefixes = [[rng.randrange(50) for _ in range(rng.choice([4, 8, 11]))] for _ in range(3)]
    live: list[Seq] = []
    done = {"allocate": 0, "append": 0, "free": 0}
    for _ in range(1000):
        op = rng.random()
        if op < 0.4:
            seq = Seq(rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))])
            n = rng.randrange(1, len(seq.tokens) + 1)
            hit = bm.find_cached_prefix(seq, n - 1)
            if bm.can_allocate(hit, n):
                bm.allocate(seq, hit, n)
                bm.cache_full_blocks(seq, n)
                seq.computed = n
                live.append(seq)
                done["allocate"] += 1
        elif op < 0.7 and live:
            seq = rng.choice(live)
            seq.tokens.append(rng.randrange(50))
            if bm.can_append_slots(seq, len(seq.tokens)):
                bm.append_slot(seq, len(seq.tokens))
                bm.cache_full_blocks(seq, len(seq.tokens))
                done["append"] += 1
            else:
                seq.tokens.pop()
        elif live:
            bm.free(live.pop(rng.randrange(len(live))))
            done["free"] += 1
        check_invariants(bm, live)
    for seq in live:
        bm.free(seq)
    check_invariants(bm, [])
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert min(done.values()) > 100  # every kind of operation really ran
    assert bool(bm.cached_blocks) == prefix_caching
