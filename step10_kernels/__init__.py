"""Step 10 — kernels: fuse what happens between the matmuls, and read the KV pool in place.

Central rule: the kernels are a backend chosen when the engine is built (``--kernels``), never a
branch in the model. A layer is seven matmuls and about forty small ops; on a GPU each small op is
a launch and each pass over memory costs bandwidth, and step 07's attention first gathers every
sequence's blocks into a padded copy. Step 10 replaces the small ops, not the matmuls:

* ``triton`` (CUDA): paged attention that walks each sequence's block table in the pool (decode,
  prefill, chunked prefill and speculative verification in one kernel; GQA; sliding windows;
  flash-decoding splits), RoPE fused with the KV store, residual add fused with RMSNorm (Gemma's
  ``1 + w`` sandwich too), GELU/SiLU fused with the up projection's product;
* ``compile`` (the CPU's serving path; upstream Triton has no CPU backend): torch.compile of the
  code between two attention calls, with the token count dynamic, compiled once at start-up.

Greedy output stays transformers' on the tiny models (the kernels under ``TRITON_INTERPRET=1``,
and ``compile``, are tested token for token); the real model obeys the log-probability rule.

What changed from step 09: the runner's model gets a layer runner (``shared.model.LayerRunner``,
a seam added here with the eager loop as its default) and, for ``triton``, an attention backend;
nothing else. Left out on purpose: CUDA graphs (no GPU to test them in this step's session: the
README says what they would take), FP8 KV caches, fusing norms into the matmuls, autotuning.
"""
