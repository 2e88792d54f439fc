"""Prompt log-probabilities (vLLM's ``prompt_logprobs``; ``echo`` with ``logprobs`` in the API).

Central rule: they come out of the prefill the request needs anyway. A prefill chunk of tokens
``start : end`` computes the model's output at each of those positions; the output at position
``p`` is the distribution of token ``p + 1``. So a chunk of a sequence that asks for prompt
logprobs also keeps the logits of its positions ``start : min(end, P - 1)`` (``P`` prompt tokens;
the output at ``P - 1`` is the first sampled token's), and each fills the entry of prompt token
``p + 1``. Entry 0 stays None: nothing precedes the first token. Entries are written by position,
so a chunk computed twice (a preempted sequence recomputed) writes the same values again.

Such a request must compute its whole prompt: a prefix cache skips positions whose logits would
then be missing, so step 07's scheduler does not reuse cached blocks for it (as vLLM does).

Left out: a cap on the logits kept per step below the step's token budget (``[budget, vocab]``
floats at most: 256 x 262,144 x 4 bytes = 256 MiB for Gemma 3 at the default budget).
"""
from __future__ import annotations

import dataclasses

import torch

from shared.engine import PromptLogprob
from step04_kvcache.scheduler import SchedulerOutput
from step04_kvcache.sequence import Sequence


@dataclasses.dataclass(frozen=True, slots=True)
class PromptSpan:
    """Positions ``start : start + count`` of ``seq`` keep their logits; ``row`` is the packed row
    of the first of them."""

    seq: Sequence
    start: int
    count: int
    row: int


def prompt_spans(out: SchedulerOutput, num_decode_tokens: int | None = None) -> list[PromptSpan]:
    """The spans of this step's prefill chunks whose sequences ask for prompt logprobs.
    ``num_decode_tokens``: the decodes' packed rows (one each unless they verify drafts)."""
    spans = []
    row = len(out.decodes) if num_decode_tokens is None else num_decode_tokens  # decodes first, then the chunks
    for c in out.prefills:
        seq = c.seq
        if seq.prompt_logprobs is not None:
            end = min(c.start + c.num_tokens, seq.num_prompt_tokens - 1)
            if end > c.start:
                spans.append(PromptSpan(seq, c.start, end - c.start, row))
        row += c.num_tokens
    return spans


def span_rows(spans: list[PromptSpan]) -> list[int]:
    return [s.row + i for s in spans for i in range(s.count)]


def record(spans: list[PromptSpan], logits: torch.Tensor) -> None:
    """Fill the spans' entries from their logits ``[sum(count), vocab]`` (in ``span_rows`` order)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    i = 0
    for span in spans:
        seq, k = span.seq, span.seq.params.prompt_logprobs or 0
        block = lp[i: i + span.count]  # [count, vocab]
        i += span.count
        targets = torch.tensor(seq.prompt_token_ids[span.start + 1: span.start + 1 + span.count])
        chosen = block.gather(1, targets[:, None].to(block.device))[:, 0].tolist()
        tops = torch.topk(block, k) if k else None
        for j in range(span.count):
            top = tuple(zip(tops.indices[j].tolist(), tops.values[j].tolist())) if tops is not None else ()
            seq.prompt_logprobs[span.start + 1 + j] = PromptLogprob(chosen[j], top)
