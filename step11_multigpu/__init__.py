"""Step 11 — tensor parallelism: one model split over several ranks, one scheduler, one sampler.

Central rule: rank 0 decides, every rank computes. Rank 0 runs the API, the scheduler and the
sampler; each step it sends the prepared batch to the N - 1 worker processes, and every rank runs
the same forward over its slice of every layer (``tp.apply_tp``'s column/row scheme: heads and MLP
features split, two all-reduces per layer, the vocabulary split with its logits gathered on rank
0). ``gloo`` on a CPU (each rank pinned to its own cores), ``nccl`` on GPUs (one per rank).

Greedy output on the tiny models is token for token the one-rank engine's (the all-reduces sum in
another order; the tiny models' logit gaps absorb that, tested). A worker that dies is a clear
error on ``/health`` and a fast 503 for requests; shutting down leaves no process behind.

What changed from step 10: a transform (``tp.py``: ``shard_model`` before step 08's ``quantize``,
``parallel_vocab`` after), a runner that forwards each batch to the workers (``executor.py``), and
the flag ``--tensor-parallel-size``. One rank is step 10 exactly.

Left out on purpose: pipeline and sequence parallelism, overlapping communication with compute,
CUDA graphs and draft models across ranks, and several machines (the rendezvous is a local file).
"""
