"""The draft model: the served model in a cheaper form, reading the TARGET's KV cache.

Gemma 3 270M has no smaller sibling, so the draft is the same model made cheaper, two ways
(``--speculative-draft``):

* ``int4``: step 08's int4 copy of the model (every layer; its LM head int8, as step 08 keeps it);
* ``early-exit``: the target's own first ``--speculative-draft-layers`` layers, its final norm and
  its LM head (no second copy of anything).

Central rule: the draft has no KV cache of its own. It has the target's shape, so its layer ``i``
reads the target's layer-``i`` K/V for the context, through the same block tables: there is no
draft cache to fill in prefill, to keep in step with the prefix cache or to roll back. Draft
steps write their K/V at the speculative positions; the verification pass rewrites those
positions (all layers) with the target's values, and positions past the accepted tokens are
masked until a later step overwrites them. For early exit the context K/V are exactly its own;
for the int4 draft they are the target's (close to what int4 would compute): that changes only
how often drafts are accepted, never the output, which verification decides.

Each draft step is one batched forward of the decoding sequences that speculate (one token each);
``k`` drafts cost ``k`` such forwards. Greedy and seeded requests propose the draft's argmax (``q``
one-hot: a seeded request's random stream is then consumed exactly as without speculation, so
its output does not depend on the batch it ran in: ``rejection.py``); unseeded sampled ones draw
from the draft's distribution under the request's own temperature / top-k / top-p, and the
draft's probabilities ``q`` go to the rejection sampler.

Left out: separately trained drafts (EAGLE, Medusa heads: nothing small is shipped for Gemma 3
270M), a draft with its own KV pool, tree attention.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch
from torch import nn

from shared.attention import build_batch
from shared.kv_cache import KVCache
from shared.model import Transformer
from shared.models import LoadedModel
from shared.sampling import filtered_probs
from step08_quant.quantize import quantize
from step09_speculative.scheduler import SpecSequence


def int4_draft(lm: LoadedModel) -> Transformer:
    """Step 08's int4 copy of the loaded model (group size 32, LM head int8)."""
    return quantize(Transformer.from_hf_model(lm.model), "int4", 32)


def early_exit(model: Transformer, num_layers: int) -> Transformer:
    """A model of ``model``'s first ``num_layers`` layers, sharing every weight (a transform: the
    original is untouched)."""
    a = model.args
    if not 1 <= num_layers < a.num_layers:
        raise ValueError(f"--speculative-draft-layers must be in [1, {a.num_layers - 1}] for this model "
                         f"({a.num_layers} layers), got {num_layers}")
    draft = copy.copy(model)  # shallow: same parameters, same backend
    draft._modules = dict(model._modules)  # its own module table, so the original keeps all its layers
    draft.layers = nn.ModuleList(list(model.layers)[:num_layers])
    draft.args = dataclasses.replace(a, num_layers=num_layers, rope_thetas=a.rope_thetas[:num_layers],
                                     rope_factors=a.rope_factors[:num_layers],
                                     sliding_windows=a.sliding_windows[:num_layers])
    return draft


class DraftModelProposer:
    """Proposes by running the draft autoregressively over the batch, on the target's cache."""

    name = "draft"

    def __init__(self, draft: Transformer, cache: KVCache, device: torch.device) -> None:
        self.draft, self.cache, self.device = draft, cache, device

    @torch.inference_mode()
    def propose_for(self, seqs: Sequence[SpecSequence]) -> None:
        """Each sequence's ``num_lookahead_tokens`` draft tokens (its table has room for them), and,
        when it samples, their draft probabilities ``[k, V]``."""
        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        live = [i for i, s in enumerate(seqs) if s.num_lookahead_tokens > 0]
        step = 0
        while live:
            b = build_batch([[tokens[i][-1] if step else seqs[i].last_token_id] for i in live],
                            [seqs[i].num_computed_tokens + step for i in live],
                            [seqs[i].block_table for i in live], self.cache.block_size, self.device)
            logits = self.draft(b.input_ids, b.positions, self.cache, b.attn_metadata, b.logits_indices).float()
            greedy = logits.argmax(dim=-1).tolist()
            for row, i in enumerate(live):
                s = seqs[i]
                if s.params.greedy or s.generator is not None:
                    tokens[i].append(greedy[row])
                    continue
                q = filtered_probs(logits[row], s.params)
                tokens[i].append(int(torch.multinomial(q, 1, generator=s.generator)))
                probs[i].append(q)
            step += 1
            live = [i for i in live if len(tokens[i]) < seqs[i].num_lookahead_tokens]
        for s, t, p in zip(seqs, tokens, probs):
            s.spec_token_ids, s.draft_probs = t, torch.stack(p) if p else None
