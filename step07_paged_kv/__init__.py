"""Step 07 — a paged KV cache with block tables, prefix caching and preemption.

Central rule: KV memory is a pool of fixed-size blocks handed out as sequences grow; a full block
is named by a hash chained to its prefix and shared by every sequence with that prefix; when the
pool runs dry, the newest running sequence is preempted and later recomputed, never failed.

What changed from step 04: the cache is ``PagedKVCache`` (``paged_cache.py``: per layer a pool
``[num_blocks, block_size, Hkv, D]``) behind the same ``KVCache`` protocol, so
``shared.attention`` gathers each sequence's blocks by its block table (plain torch paged
attention) without a line changed. ``BlockManager`` (``block_manager.py``: ``can_allocate``,
``allocate``, ``append_slots``, ``free``, chained hashes, reference counts, LRU eviction of free
cached blocks) owns the pool; ``PagedScheduler`` (``scheduler.py``) allocates on demand, skips
cached prefixes in prefill, preempts, and reports KV usage in blocks, waste
(``kv_accounting.py``), preemptions and prefix-cache queries and hits (``/health``, ``/metrics``),
and each request's cached prompt tokens (``usage.prompt_tokens_details``);
``build_paged_runner`` (``model_runner.py``) sizes the pool by bytes (``--kv-cache-gib``,
``--kv-cache-memory-fraction`` or ``--num-kv-blocks``) under step 04's ``ModelRunner``.
``__main__.py`` assembles step 06's engine with these two parts swapped in, so metrics,
admission and deadlines stay: ``EngineCore(scheduler=PagedScheduler(..., BlockManager(...)),
runner=build_paged_runner(...), observers=[...], policies=[deadlines])``.

Sliding-window layers (Gemma 3): blocks that leave the window are NOT freed. One block table
serves all layers, and the global layers (every sixth in Gemma 3) still read every position, so a
block is only free when no layer needs it; freeing per window needs one block table per layer
group (vLLM's hybrid allocator), which costs more bookkeeping than it saves at these lengths.

Left out on purpose: swapping preempted sequences to host memory (recompute only, as vLLM v1),
per-layer-group block tables, a paged attention kernel (step 10), copy-on-write of partial blocks
(only full blocks are shared, so nothing is ever written into a shared block), cache salting.
"""
