"""Verification: which proposed tokens the target model accepts, so that the output is exactly the target's.

Central rule (Leviathan et al. 2023; Chen et al. 2023). The target scored the sequence's last token
and the ``k`` draft tokens ``x_1..x_k`` in one pass: ``p_j`` is its distribution at draft ``j``.
For j = 1..k: accept ``x_j`` with probability ``min(1, p_j(x_j) / q_j(x_j))``; at the first
rejection emit a token drawn from ``norm(max(p_j - q_j, 0))`` and stop; if all ``k`` are accepted,
emit a bonus token drawn from ``p_{k+1}``. Every emitted token is then distributed exactly as if
the target had sampled it alone. Greedy (temperature 0) is the limit: accept while ``x_j`` is the
target's argmax, then emit the argmax, so the output is token for token the target's.

When the proposal is one token with certainty (``q`` one-hot: n-gram proposals, and the draft's
proposals for seeded requests), the rule reduces to "draw ``y`` from ``p_j``; accept ``x_j`` iff
``y == x_j``, else emit ``y``": ``P(accept) = p_j(x_j)`` and a rejected draw is distributed as
``norm(max(p_j - onehot, 0))``. Drawn that way, with the request's own generator and the same
draw as step 08's sampler, one draw per emitted token, a seeded request's stream is consumed
exactly as without speculation: seeded output does not depend on what was proposed.

``p_j`` is computed as the sampler computes it (``shared.sampling``: penalties over the output so
far plus the drafts accepted before ``j``, ``min_tokens``, temperature, top-k, top-p, min-p);
``logprobs`` are taken from the raw logits at the emitted token's position, as without speculation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from shared.engine import TokenEvent
from shared.sampling import apply_penalties, draw, filtered_probs, is_plain
from step04_kvcache.engine_core import RowSampler
from step04_kvcache.scheduler import SchedulerOutput
from step09_speculative.scheduler import SpecSequence


def verify(probs_at: Callable[[int], torch.Tensor], draft: Sequence[int], draft_probs: torch.Tensor | None,
           generator: torch.Generator | None) -> list[int]:
    """The emitted tokens: the accepted drafts, then one token of the target's (a correction or
    the bonus). ``probs_at(j)``: the target's distribution ``[V]`` at draft ``j`` (``j = len(draft)``:
    after the last), asked only for the positions reached; ``draft_probs``: ``q [k, V]``, or None
    for one-hot proposals."""
    out: list[int] = []
    for j, x in enumerate(draft):
        p = probs_at(j)
        if draft_probs is None:  # q one-hot at x
            y = draw(p, generator)
            out.append(y)
            if y != x:
                return out
            continue
        q = draft_probs[j]
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * float(q[x]) < float(p[x]):  # u < p/q, without dividing by a zero q
            out.append(x)
            continue
        residual = (p - q).clamp(min=0)
        total = float(residual.sum())
        out.append(draw(residual / total if total > 0 else p, generator))
        return out
    out.append(draw(probs_at(len(draft)), generator))
    return out


def verify_greedy(argmax: Sequence[int], draft: Sequence[int]) -> list[int]:
    """Greedy: accept while the draft is the target's argmax; then the argmax (a correction or bonus)."""
    n = next((j for j, x in enumerate(draft) if x != argmax[j]), len(draft))
    return [*draft[:n], argmax[n]]


class SpeculativeSampler:
    """The engine's sampler part: rows without drafts go through step 04's batched sampler; a row
    with ``k`` drafts has ``k + 1`` logits rows and is verified."""

    def __init__(self, eos_token_ids: tuple[int, ...]) -> None:
        self.eos_token_ids = eos_token_ids
        self.rows = RowSampler(eos_token_ids)

    def sample(self, out: SchedulerOutput, rows: list[SpecSequence], logits: torch.Tensor) -> list[list[TokenEvent]]:
        drafts = [s.spec_token_ids for s in rows]
        if not any(drafts):
            return self.rows.sample(out, rows, logits)
        starts, r = [], 0
        for d in drafts:
            starts.append(r)
            r += 1 + len(d)
        single = [i for i, d in enumerate(drafts) if not d]
        result: list[list[TokenEvent]] = [[] for _ in rows]
        if single:  # every row without drafts: one batched call, as step 04 samples
            idx = torch.tensor([starts[i] for i in single], device=logits.device)
            for i, events in zip(single, self.rows.sample(out, [rows[i] for i in single], logits[idx])):
                result[i] = events
        plain = {i for i, s in enumerate(rows) if drafts[i] and s.params.greedy and is_plain(s.params, s.output_token_ids)}
        argmax = logits.float().argmax(dim=-1).tolist() if plain else []  # one call (float: as the sampler)
        for i, seq in enumerate(rows):
            if not drafts[i]:
                continue
            k = len(drafts[i])
            block = logits[starts[i]:starts[i] + 1 + k]  # [k + 1, V]: after the last token, after each draft
            if i in plain:
                tokens = verify_greedy(argmax[starts[i]:starts[i] + k + 1], drafts[i])
            elif seq.params.greedy:  # penalties or min_tokens change the argmax
                tokens = verify_greedy([int(self._logits_at(block, seq, j).argmax()) for j in range(k + 1)], drafts[i])
            else:
                tokens = verify(lambda j: filtered_probs(self._logits_at(block, seq, j), seq.params), drafts[i],
                                seq.draft_probs, seq.generator)
            result[i] = self._events(block, tokens, seq.params.logprobs)
        return result

    def _logits_at(self, block: torch.Tensor, seq: SpecSequence, j: int) -> torch.Tensor:
        """The target's logits at draft ``j`` as ``shared.sampling.sample`` would see them there:
        penalties over the output plus the drafts before ``j``, EOS masked below ``min_tokens``."""
        row, p = block[j].to(torch.float32, copy=True), seq.params  # a copy, in the sampler's float32
        output = [*seq.output_token_ids, *seq.spec_token_ids[:j]]
        apply_penalties(row, p, output)
        if len(output) < p.min_tokens:
            row[list(self.eos_token_ids)] = float("-inf")
        return row

    @staticmethod
    def _events(block: torch.Tensor, tokens: list[int], k: int | None) -> list[TokenEvent]:
        if k is None:
            return [TokenEvent(t) for t in tokens]
        lp = torch.log_softmax(block[:len(tokens)].float(), dim=-1)  # the raw logits' log-probabilities
        events = []
        for j, t in enumerate(tokens):
            top = ()
            if k:
                vals, ids = torch.topk(lp[j], k)
                top = tuple(zip(ids.tolist(), vals.tolist()))
            events.append(TokenEvent(t, float(lp[j, t]), top))
        return events
