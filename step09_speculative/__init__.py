"""Step 09 — speculative decoding: propose several tokens cheaply, verify them in one forward, keep the target's output exactly.

Central rule: decoding one token reads every weight once; feeding ``1 + k`` tokens of a sequence
reads them once too. So each step a proposer guesses up to ``k`` next tokens per decoding sequence
(``ngram``: copied from earlier in the sequence; ``draft``: the model's own first layers), the
target scores the last token and every guess in ONE forward inside the continuous batch, and the
rejection sampler (``rejection.py``) keeps the longest run of guesses the target agrees with plus
one token of its own. Greedy output is token for token step 08's; sampled output has the target's
distribution exactly. Rejected guesses give their KV room back the same step.

What changed from step 08 (same model runner underneath, same server and flags): the model runner
proposes and packs ``1 + k`` tokens per decode (``model_runner.py``, ``ngram.py``, ``draft.py``),
the scheduler reserves room for the guesses and truncates block tables after verification
(``scheduler.py``), the sampler verifies (``rejection.py``), and ``/metrics`` and ``/health`` count
drafts and acceptances (``metrics.py``). The decodes of a step share ``--speculative-max-verify-tokens``
fed tokens, so a big batch decodes as step 08 (verification is not free on a CPU).

Left out on purpose: tree / multi-candidate verification (Medusa, EAGLE trees), trained draft
heads (EAGLE, MTP; none is shipped for Gemma 3 270M), a separate draft model with its own KV pool
(the early-exit draft shares the target's cache: ``draft.py``), overlapping drafting with the
target's forward, adaptive ``k`` per sequence.
"""
