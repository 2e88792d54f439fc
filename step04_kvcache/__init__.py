"""Step 04 — our own model and KV cache, and continuous (iteration-level) batching.

Central rule: the scheduler decides again at EVERY step (one forward pass) who runs: first one
decode token for every running sequence, then prompt tokens (chunked, first come first served)
up to the ``--max-num-batched-tokens`` budget. New requests join at the next step; finished or
cancelled ones leave at once and free their KV-cache row for the next one.

What changed from step 03: the forward pass is ``shared/model.py`` (our plain-torch Transformer,
same weights as transformers', which step 03 ran) with an explicit KV cache, a
``ContiguousKVCache`` of ``--max-seqs`` rows x ``--max-model-len`` positions, one row per running
sequence. A prompt is prefilled (possibly in chunks) into its row, then each decode step feeds one
token; prefills and decodes of different sequences share one forward. ``Sequence`` /
``Scheduler.schedule() -> SchedulerOutput`` (``scheduler.py``) decide each step, ``ModelRunner``
(``model_runner.py``) packs it into one forward, and the ``ContinuousEngine`` (``engine.py``) runs
the loop on its own thread, samples every row that produces a token with ONE call of the shared
batched sampler, and hands all of the step's tokens to the event loop in one call. An observer
hook (``observer.py``) reports every step and every finished request, for step 05's metrics.
On CPU the model's linear layers run on oneDNN with weights prepacked once (``shared/cpu_linear.py``,
``--linear-backend``, a transform chosen when the engine is built): measured 2x faster batch-16
decode steps than MKL's sgemm here.

Left out on purpose: a paged cache (the contiguous rows reserve ``max_len`` positions per
sequence whatever its length: step 07), preemption (a row is never taken back, so never needed
here), prefix caching, priorities, CUDA graphs, and overlapping the CPU bookkeeping of one step
with the forward of the next.
"""
