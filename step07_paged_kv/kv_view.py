"""Step 07's section of the playground's engine view: the KV block pool, block by block.

Each block is free, used by one or more running sequences (more than one: a shared prefix block),
or cached-free (no owner, but its K/V still cached for a future prefix hit: evicted last-freed
first). A pool of up to :data:`GRID` blocks is drawn whole; a larger one (the default pool holds
tens of thousands) as its used and cached blocks only, with the free ones counted.
"""
from __future__ import annotations

from typing import Any

from step04_kvcache.engine_core import EngineCore

GRID = 1024


def kv_pool(core: EngineCore) -> dict[str, Any]:
    bm = core.scheduler.block_manager
    owners: dict[int, list[str]] = {}
    for seq in list(core.scheduler.running):
        for block_id in list(seq.block_table):
            owners.setdefault(block_id, []).append(seq.request_id)
    cached_free = set(list(bm.evictable))
    ids = range(bm.num_blocks) if bm.num_blocks <= GRID else sorted({*owners, *cached_free})[:GRID]
    return {"kv": {
        "num_blocks": bm.num_blocks, "block_size": bm.block_size, "whole_pool": bm.num_blocks <= GRID,
        "num_free": len(bm.free_block_ids), "num_cached_free": len(cached_free),
        "blocks": [[i, owners.get(i, []), i in cached_free] for i in ids]}}  # [id, owners, cached-free]
