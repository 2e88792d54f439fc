"""Step 00 — the brute-force baseline: load the model inside every request.

Central rule: nothing is kept between requests. Each request loads the weights (and tokenizer)
from disk, runs transformers' forward pass token by token on its own thread, and drops the model.
Only the tokenizer the API needs to read prompts, and the one-time GGUF conversion, are done at
start-up. This is the number every later step is measured against.

Left out on purpose: loading once (step 01), any limit on concurrent requests (step 02), batching
(step 03). Concurrent requests each load their own copy of the weights.
"""
