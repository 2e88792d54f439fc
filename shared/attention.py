"""Attention over a packed batch of variable-length sequences, reading and writing a KV cache.

Central rule: everything attention needs arrives in :class:`AttentionMetadata` (vLLM's names) and
the cache object; nothing is remembered between calls. One forward may mix prefills (or prefill
chunks) and decodes: tokens of all sequences are flattened into ``[T]``, sequence ``i`` owning
tokens ``query_start_loc[i] : query_start_loc[i + 1]``.

:class:`TorchAttentionBackend` is plain torch. Decodes (sequences with one new token, placed first
in the batch) go through ONE ``scaled_dot_product_attention`` call: each sequence's cache rows are
gathered into ``[B, L]`` padded with masked entries. Prefills go through one more padded call.
A Triton or paged kernel is another backend with the same ``plan`` / ``forward`` methods, chosen
when the engine is built.

Left out: CUDA graphs, padded token batches (``slot_mapping == -1``), cross attention, ALiBi.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from shared.kv_cache import KVCache


@dataclasses.dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where the new tokens' K/V go and which cache positions each sequence reads.

    ``T`` new tokens from ``N`` sequences; the first ``num_decodes`` sequences are decodes (vLLM's
    "decodes first" order): one new token each, or up to ``max_decode_query_len`` when a step
    verifies speculative tokens (step 09; vLLM's ``reorder_batch_threshold``). The rest are
    prefills or prefill chunks. The host ints let the backend size its padded tensors without
    reading device memory.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to
    query_start_loc: torch.Tensor  # [N + 1] int64: cu_seqlens of the packed new tokens
    seq_lens: torch.Tensor  # [N] int64: tokens in the cache after this step (context + new)
    context_lens: torch.Tensor  # [N] int64: tokens already in the cache before this step
    block_tables: torch.Tensor  # [N, max_blocks] int64: contiguous cache -> [[row], ...]
    num_decodes: int  # leading sequences with at most max_decode_query_len new tokens
    max_query_len: int  # most new tokens of any sequence
    max_decode_seq_len: int  # largest seq_len among the decodes (0 if none)
    max_prefill_seq_len: int  # largest seq_len among the prefills (0 if none)
    num_decode_tokens: int = -1  # new tokens of the decodes (-1: num_decodes, one each)
    max_decode_query_len: int = 1  # most new tokens of any decode

    def __post_init__(self) -> None:
        if self.num_decode_tokens < 0:
            object.__setattr__(self, "num_decode_tokens", self.num_decodes)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclasses.dataclass(frozen=True, slots=True)
class BatchInputs:
    """Everything one ``Transformer.forward`` call takes besides the cache."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [N] int64: last new token of each sequence


def build_batch(token_ids: Sequence[Sequence[int]], context_lens: Sequence[int],
                block_tables: Sequence[Sequence[int]], block_size: int,
                device: torch.device | str = "cpu", decode_query_len: int = 1) -> BatchInputs:
    """Pack the new tokens of N sequences (sequence ``i`` has ``context_lens[i]`` cached tokens).

    Put decodes (at most ``decode_query_len`` new tokens: one, or one plus the speculative tokens
    to verify) first to get the batched decode path; any order is correct.
    """
    if not len(token_ids) == len(context_lens) == len(block_tables) > 0:
        raise ValueError("token_ids, context_lens, block_tables: need the same non-zero length")
    query_lens = [len(t) for t in token_ids]
    if min(query_lens) < 1:
        raise ValueError("token_ids: every sequence needs at least one new token")
    if min(context_lens) < 0:
        raise ValueError("context_lens: must be >= 0")
    width = max(len(b) for b in block_tables)
    q_lens = torch.tensor(query_lens)
    ctx = torch.tensor(list(context_lens))
    tables = torch.tensor([list(b) + [0] * (width - len(b)) for b in block_tables])  # [N, width]
    seq_lens = ctx + q_lens
    if int((seq_lens > width * block_size).sum()):
        raise ValueError("block_tables: too few blocks for context_lens + new tokens")
    qsl = F.pad(q_lens.cumsum(0), (1, 0))  # [N + 1]
    seq_idx = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)  # [T]
    positions = ctx[seq_idx] + torch.arange(int(qsl[-1])) - qsl[seq_idx]  # [T]
    blocks = tables[seq_idx, positions // block_size]
    num_decodes = next((i for i, n in enumerate(query_lens) if n > decode_query_len), len(query_lens))
    sl = seq_lens.tolist()
    md = AttentionMetadata(
        slot_mapping=(blocks * block_size + positions % block_size).to(device),
        query_start_loc=qsl.to(device), seq_lens=seq_lens.to(device), context_lens=ctx.to(device),
        block_tables=tables.to(device), num_decodes=num_decodes, max_query_len=max(query_lens),
        max_decode_seq_len=max(sl[:num_decodes], default=0),
        max_prefill_seq_len=max(sl[num_decodes:], default=0), num_decode_tokens=sum(query_lens[:num_decodes]),
        max_decode_query_len=max(query_lens[:num_decodes], default=1))
    ids = torch.tensor([t for seq in token_ids for t in seq], device=device)
    return BatchInputs(input_ids=ids, positions=positions.to(device), attn_metadata=md,
                       logits_indices=(qsl[1:] - 1).to(device))


@dataclasses.dataclass(frozen=True, slots=True)
class AttentionPart:
    """Padded attention over sequences ``seq_start:seq_end`` (tokens ``token_start:token_end``)."""

    seq_start: int
    seq_end: int
    token_start: int
    token_end: int
    num_queries: int  # Q: padded new tokens per sequence
    query_index: torch.Tensor | None  # [tokens] row of each token in the padded [B * Q]; None if Q == 1
    kv_slots: torch.Tensor  # [B, L] cache slots to read (always slots this sequence has written)
    mask: torch.Tensor  # [B, 1, G * Q, L] bool, True = attend


@dataclasses.dataclass(frozen=True, slots=True)
class AttentionPlan:
    """Per-forward index and mask tensors for one kind of layer (one sliding window)."""

    slot_mapping: torch.Tensor  # [T]
    parts: tuple[AttentionPart, ...]


class AttentionBackend(Protocol):
    """How attention is computed; the model calls ``plan`` once per forward per window, then
    ``forward`` in every layer with that plan. The plan's type is the backend's own business."""

    def plan(self, md: AttentionMetadata, cache: KVCache, num_tokens: int, sliding_window: int | None,
             num_queries_per_kv: int) -> Any: ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                plan: Any, scale: float, softcap: float | None) -> torch.Tensor: ...


class TorchAttentionBackend:
    """Gather each sequence's cache rows, mask, one SDPA call per part (decodes, prefills)."""

    def plan(self, md: AttentionMetadata, cache: KVCache, num_tokens: int, sliding_window: int | None,
             num_queries_per_kv: int) -> AttentionPlan:
        """Build the masks and gather indices once per forward, shared by all layers of a kind."""
        n, d, dt = md.num_seqs, md.num_decodes, md.num_decode_tokens
        parts = []
        if d > 0:
            parts.append(_plan_part(md, cache, 0, d, 0, dt, md.max_decode_query_len, md.max_decode_seq_len,
                                    sliding_window, num_queries_per_kv))
        if n > d:
            parts.append(_plan_part(md, cache, d, n, dt, num_tokens, md.max_query_len,
                                    md.max_prefill_seq_len, sliding_window, num_queries_per_kv))
        return AttentionPlan(slot_mapping=md.slot_mapping, parts=tuple(parts))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                plan: AttentionPlan, scale: float, softcap: float | None) -> torch.Tensor:
        """``q [T, H, D]``, new ``k``/``v [T, Hkv, D]`` -> ``[T, H, D]``; writes k/v to the cache."""
        cache.write(layer, k, v, plan.slot_mapping)
        outs = [_attend_part(q[p.token_start:p.token_end], cache, layer, p, scale, softcap)
                for p in plan.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _plan_part(md: AttentionMetadata, cache: KVCache, s0: int, s1: int, t0: int, t1: int, num_q: int,
               max_seq_len: int, window: int | None, group: int) -> AttentionPart:
    seq_lens, ctx = md.seq_lens[s0:s1], md.context_lens[s0:s1]  # [B]
    dev = seq_lens.device
    kv_len = max_seq_len if window is None else min(max_seq_len, window + num_q - 1)
    start = (seq_lens - kv_len).clamp(min=0) if window is not None else torch.zeros_like(seq_lens)
    kv_pos = start[:, None] + torch.arange(kv_len, device=dev)  # [B, L]
    q_pos = ctx[:, None] + torch.arange(num_q, device=dev)  # [B, Q]
    allowed = kv_pos[:, None, :] <= q_pos[:, :, None]  # [B, Q, L] causal
    if window is not None:
        allowed &= kv_pos[:, None, :] > q_pos[:, :, None] - window
    q_lens = seq_lens - ctx
    allowed |= (torch.arange(num_q, device=dev) >= q_lens[:, None])[:, :, None]  # padding rows: no NaN
    b = s1 - s0
    mask = allowed[:, None, None].expand(b, 1, group, num_q, kv_len).reshape(b, 1, group * num_q, kv_len)
    # Clamp so that padding columns re-read a written slot (a cache filled with NaN stays harmless).
    kv_slots = cache.slots(md.block_tables[s0:s1], torch.minimum(kv_pos, seq_lens[:, None] - 1))
    query_index = None
    if num_q > 1:
        local_qsl = md.query_start_loc[s0:s1 + 1] - md.query_start_loc[s0]
        seq_idx = torch.repeat_interleave(torch.arange(b, device=dev), q_lens, output_size=t1 - t0)
        query_index = seq_idx * num_q + torch.arange(t1 - t0, device=dev) - local_qsl[seq_idx]
    return AttentionPart(seq_start=s0, seq_end=s1, token_start=t0, token_end=t1, num_queries=num_q,
                         query_index=query_index, kv_slots=kv_slots, mask=mask)


def _attend_part(q: torch.Tensor, cache: KVCache, layer: int, part: AttentionPart, scale: float,
                 softcap: float | None) -> torch.Tensor:
    b, num_q = part.seq_end - part.seq_start, part.num_queries
    k, v = cache.gather(layer, part.kv_slots)  # [B, L, Hkv, D]
    hkv, dim = k.shape[2], k.shape[3]
    group = q.shape[1] // hkv
    if part.query_index is not None:  # scatter packed tokens into the padded [B * Q] rows
        padded = q.new_zeros(b * num_q, q.shape[1], dim)
        q = padded.index_copy_(0, part.query_index, q)
    # Fold each KV head's query group into the query axis: no repeat_kv copy of K/V.
    qf = q.view(b, num_q, hkv, group, dim).permute(0, 2, 3, 1, 4).reshape(b, hkv, group * num_q, dim)
    k, v = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)  # [B, Hkv, L, D] (no-op unless the
    # cache is stored in another dtype than the activations: --kv-cache-dtype)
    out = _sdpa(qf, k, v, part.mask, scale, softcap)  # [B, Hkv, G * Q, D]
    out = out.view(b, hkv, group, num_q, dim).permute(0, 3, 1, 2, 4).reshape(b * num_q, hkv * group, dim)
    return out if part.query_index is None else out[part.query_index]  # [tokens, H, D]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
          softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, G * Q, L]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
