"""The n-gram proposer (vLLM's ``ngram``, transformers' prompt lookup): no model at all.

Central rule: take the sequence's last ``n`` tokens, for ``n`` from ``prompt_lookup_max`` down to
``prompt_lookup_min``; the first ``n`` whose n-gram occurred earlier in the sequence (prompt and
output) wins, and the tokens that followed its LATEST earlier occurrence are proposed, up to
``k``. Text that copies from its prompt (summaries, code edits, quoting) is predicted exactly;
elsewhere nothing matches and nothing is proposed, so the sequence decodes as before at no cost.
(Choice: the latest occurrence, not the first as transformers takes: in a passage being copied,
the latest match is where the copy is.)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from step09_speculative.scheduler import SpecSequence


class NgramProposer:
    name = "ngram"

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose_for(self, seqs: Sequence[SpecSequence]) -> None:
        for s in seqs:
            s.spec_token_ids = self.propose(s.token_ids(0, s.num_tokens), s.num_lookahead_tokens)

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest suffix n-gram's latest earlier occurrence."""
        if k < 1 or len(token_ids) <= self.min_n:
            return []
        ids = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            windows = sliding_window_view(ids[:-1], n)  # every n-gram that ends before the last token
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # what followed the latest occurrence
                return ids[start:start + k].tolist()
        return []
