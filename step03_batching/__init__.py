"""Step 03 — request-level batching: static and dynamic.

Central rule: the worker runs a *batch* of requests through one forward pass per token, and a
batch, once started, runs until its last request finishes; requests that arrive meanwhile wait.
Batches are formed the same way in both modes: after the first request arrives, wait up to
``--max-wait-ms`` for up to ``--max-batch`` requests. *Static* batching then keeps the batch's
shape fixed (finished rows are still computed, as a compiled fixed-shape graph would);
*dynamic* batching drops a finished row from the batch and its KV cache at once.

Each request keeps its own sampling parameters inside the batch: the batched sampler honours
every row's temperature, top-k/p, min-p, penalties and seed in one pass (no grouping needed).
Prompts are left-padded with an attention mask; ``position_ids`` skip the padding.

What changed from step 02: ``BatchingEngine`` overrides ``_work`` (collect a batch, run it);
``batch_runner.generate_batch`` is the batched forward loop.

Left out on purpose: letting a new request join a running batch, and having our own KV cache
(step 04: continuous batching). The price of leaving it out is head-of-line blocking: a short
request that arrives just after a long batch started waits for the whole batch.
"""
