"""Paged attention (shared.attention over PagedKVCache) against plain contiguous attention:
random block tables, lengths that are not multiples of the block size, NaN in every unused slot."""
from __future__ import annotations

import random

import pytest
import torch

from shared.attention import TorchAttentionBackend, build_batch
from step07_paged_kv.paged_cache import PagedKVCache

BS, HKV, GROUP, D = 4, 2, 2, 8


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int, window: int | None,
              scale: float, softcap: float | None) -> torch.Tensor:
    """Contiguous attention of new queries ``q [Q, H, D]`` over ``k/v [ctx + Q, Hkv, D]``."""
    k, v = k.repeat_interleave(GROUP, dim=1), v.repeat_interleave(GROUP, dim=1)  # [L, H, D]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = ctx + torch.arange(q.shape[0])[:, None]
    k_pos = torch.arange(k.shape[0])[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_paged_attention_equals_contiguous_attention(window: int | None, softcap: float | None) -> None:
    rng = random.Random(f"{window}-{softcap}")
    torch.manual_seed(rng.randrange(1000))
    # Decodes first (one new token), then prefills and prefill chunks; no length a multiple of BS by design.
    ctx_lens = [9, 1, 14, 0, 6, 3]
    q_lens = [1, 1, 1, 7, 5, 2]
    num_blocks = 40
    cache = PagedKVCache.allocate(1, num_blocks, BS, HKV, D, torch.float32, fill=float("nan"))
    ids = list(range(num_blocks))
    rng.shuffle(ids)  # scattered, out-of-order blocks
    tables, keys, values = [], [], []
    for c, n in zip(ctx_lens, q_lens):
        need = -(-(c + n) // BS)
        tables.append([ids.pop() for _ in range(need + rng.randrange(2))])  # some tables longer than needed
        keys.append(torch.randn(c + n, HKV, D))
        values.append(torch.randn(c + n, HKV, D))
    assert all((c + n) % BS for c, n in zip(ctx_lens, q_lens))
    for table, c, k, v in zip(tables, ctx_lens, keys, values):  # the cached context, written earlier
        if c:
            pos = torch.arange(c)
            slots = torch.tensor(table)[pos // BS] * BS + pos % BS
            cache.write(0, k[:c], v[:c], slots)
    batch = build_batch([[0] * n for n in q_lens], ctx_lens, tables, BS)
    md = batch.attn_metadata
    assert md.num_decodes == 3
    q = torch.randn(sum(q_lens), HKV * GROUP, D)
    new_k = torch.cat([k[c:] for k, c in zip(keys, ctx_lens)])
    new_v = torch.cat([v[c:] for v, c in zip(values, ctx_lens)])
    backend = TorchAttentionBackend()
    plan = backend.plan(md, cache, q.shape[0], window, GROUP)
    out = backend.forward(q, new_k, new_v, cache, 0, plan, D ** -0.5, softcap)  # [T, H, D]
    assert not out.isnan().any()
    start = 0
    for c, n, k, v in zip(ctx_lens, q_lens, keys, values):
        want = reference(q[start:start + n], k, v, c, window, D ** -0.5, softcap)
        torch.testing.assert_close(out[start:start + n], want, atol=1e-5, rtol=1e-5)
        start += n
    # Only the slots of the sequences' tokens were written: everything else is still NaN.
    written = sum(c + n for c, n in zip(ctx_lens, q_lens))
    assert int((~cache.k[0].isnan().any(-1).any(-1)).sum()) == written


def test_slots_follow_the_block_table() -> None:
    cache = PagedKVCache.allocate(1, 8, BS, 1, 2, torch.float32)
    tables = torch.tensor([[5, 2, 7], [0, 3, 1]])
    positions = torch.tensor([[0, 3, 4, 9], [1, 5, 8, 11]])
    assert cache.slots(tables, positions).tolist() == [[20, 23, 8, 29], [1, 13, 4, 7]]
