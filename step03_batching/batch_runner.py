"""One request-level batch through transformers: left padding, an attention mask, per-row sampling.

Prompts of different lengths are left-padded to the longest, so every row's last prompt token sits
in the same column and each decode step appends one column to all rows. Padding is masked out and
``position_ids`` count only real tokens, so every row computes what it would compute alone (the
tests check greedy tokens against batch-1 ``generate``).

``shrink=False`` (static batching) keeps finished rows in the batch, computing padding, so the
tensor shapes never change. ``shrink=True`` (dynamic batching) removes a finished or cancelled row
from the batch and its KV cache at once. In neither case can a new request join: the batch runs
until its last row finishes. That is step 04's lesson.
"""
from __future__ import annotations

import threading
from typing import Iterator, Sequence

import torch

from shared.engine import GenerationRequest, TokenEvent
from shared.models import LoadedModel
from shared.sampling import finish_reason, make_generator, sample


def _left_pad(prompts: Sequence[tuple[int, ...]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)  # [B, S]
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, device=device)
        mask[row, width - len(p):] = 1
    return ids, mask


def generate_batch(lm: LoadedModel, requests: Sequence[GenerationRequest], cancelled: Sequence[threading.Event],
                   stop_all: threading.Event, shrink: bool) -> Iterator[tuple[int, TokenEvent]]:
    """Yield ``(index into requests, event)`` for every token of every row until all finish."""
    from transformers import DynamicCache

    params = [r.params for r in requests]
    gens = [make_generator(p, lm.device) for p in params]
    outputs: list[list[int]] = [[] for _ in requests]
    live = list(range(len(requests)))  # request index of each batch row
    done = [False] * len(requests)
    pad = lm.tokenizer.pad_token_id or 0
    ids, mask = _left_pad([r.prompt_token_ids for r in requests], pad, lm.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]: padding does not count
    cache = DynamicCache(config=lm.model.config)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                          use_cache=True, logits_to_keep=1).logits[:, -1]  # [B, V]
        while not stop_all.is_set():
            for row, i in enumerate(live):
                done[i] = done[i] or cancelled[i].is_set()
            rows = [row for row, i in enumerate(live) if not done[i]]
            if not rows:
                return
            s = sample(logits[rows], [params[live[r]] for r in rows], [outputs[live[r]] for r in rows],
                       [gens[live[r]] for r in rows], lm.eos_token_ids)
            next_tokens = torch.full((len(live),), pad, dtype=torch.long, device=lm.device)
            for k, row in enumerate(rows):
                i, token = live[row], s.token_ids[k]
                outputs[i].append(token)
                next_tokens[row] = token
                reason = finish_reason(token, len(outputs[i]), params[i], lm.eos_token_ids)
                done[i] = reason is not None
                yield i, TokenEvent(token, s.logprobs[k], s.top_logprobs[k], reason)
            keep = [row for row, i in enumerate(live) if not done[i]]
            if not keep:
                return
            if shrink and len(keep) < len(live):
                index = torch.tensor(keep, dtype=torch.long, device=lm.device)
                cache.batch_select_indices(index)
                mask, next_tokens, live = mask[index], next_tokens[index], [live[r] for r in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # [B, S + 1]
            positions = mask.sum(-1, keepdim=True) - 1  # [B, 1]
            logits = lm.model(input_ids=next_tokens[:, None], attention_mask=mask, position_ids=positions,
                              past_key_values=cache, use_cache=True).logits[:, -1]
