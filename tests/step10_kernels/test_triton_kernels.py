"""Each Triton kernel against plain torch on random inputs (guide §3): lengths that are not
multiples of the block size, several sequences of different lengths in one batch (decodes,
verification rows, prefill chunks with context), sliding windows, GQA ratios 1, 2 and 4, soft-capping,
flash-decoding splits, and NaN in every cache slot no sequence has written (nothing outside a
sequence's own written slots is read). Run under ``TRITON_INTERPRET=1`` on a CPU (conftest)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from shared.attention import TorchAttentionBackend, build_batch
from shared.model import RMSNorm, apply_rope, rope_cos_sin
from step07_paged_kv.paged_cache import PagedKVCache
from step10_kernels.triton_layers import TritonAttentionBackend
from step10_kernels.triton_ops import act_and_mul, add_rms_norm, rope_and_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HEAD_DIM = 16
MIXED = ([(9, 1), (0, 1), (22, 3), (5, 2)], [(0, 13), (7, 6), (30, 1 + 4)])  # (context, new) decodes; prefills


def filled_cache(layout: list[tuple[int, int]], num_kv_heads: int, block_size: int, seed: int):
    """A NaN pool with each sequence's context written at its (shuffled) blocks; the batch of its new tokens."""
    rng = random.Random(seed)
    need = [-(-(c + n) // block_size) for c, n in layout]
    cache = PagedKVCache.allocate(1, sum(need) + 3, block_size, num_kv_heads, HEAD_DIM, torch.float32, fill=float("nan"))
    free = list(range(cache.num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in need]
    for (c, _), table in zip(layout, tables):
        if c:
            slots = cache.slots(torch.tensor([table]), torch.arange(c)[None]).reshape(-1)
            cache.write(0, torch.randn(c, num_kv_heads, HEAD_DIM), torch.randn(c, num_kv_heads, HEAD_DIM), slots)
    return cache, tables


def attend_both(layout, num_kv_heads, group, block_size, window, softcap, splits, decode_query_len=3):
    torch.manual_seed(len(layout) * 7 + group)
    cache, tables = filled_cache(layout, num_kv_heads, block_size, seed=group * 13 + block_size)
    b = build_batch([[1] * n for _, n in layout], [c for c, _ in layout], tables, block_size,
                    decode_query_len=decode_query_len)
    t = b.input_ids.shape[0]
    q = torch.randn(t, num_kv_heads * group, HEAD_DIM)
    k, v = torch.randn(t, num_kv_heads, HEAD_DIM), torch.randn(t, num_kv_heads, HEAD_DIM)
    ref_cache = PagedKVCache(k=tuple(x.clone() for x in cache.k), v=tuple(x.clone() for x in cache.v))
    ref_backend, tri = TorchAttentionBackend(), TritonAttentionBackend(num_splits=splits)
    ref = ref_backend.forward(q, k, v, ref_cache, 0, ref_backend.plan(b.attn_metadata, ref_cache, t, window, group),
                              0.3, softcap)
    out = tri.forward(q, k, v, cache, 0, tri.plan(b.attn_metadata, cache, t, window, group), 0.3, softcap)
    return out, ref


@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (2, 2), (1, 4), (2, 3)])  # GQA 1, 2, 4, and not a power of 2
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_matches_torch_on_a_mixed_batch(num_kv_heads: int, group: int, window: int | None,
                                                        block_size: int) -> None:
    out, ref = attend_both(MIXED[0] + MIXED[1], num_kv_heads, group, block_size, window, None, splits=1)
    assert not out.isnan().any(), "a NaN slot was read"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [2, 4])
@pytest.mark.parametrize("window", [None, 7])
def test_split_decode_matches_torch(splits: int, window: int | None) -> None:
    """Pure decodes (flash-decoding): the KV range of each sequence split over programs, then reduced;
    a split may get no block at all (short sequences) and must weigh nothing."""
    out, ref = attend_both([(40, 1), (3, 1), (17, 1), (64, 1)], 1, 4, 4, window, None, splits)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_soft_capped_attention_matches_torch() -> None:
    out, ref = attend_both(MIXED[0] + MIXED[1], 1, 4, 4, None, 2.0, splits=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rope_and_store_rotates_q_and_writes_only_the_mapped_slots() -> None:
    torch.manual_seed(0)
    t, h, hkv = 7, 4, 2
    q, k, v = torch.randn(t, h, HEAD_DIM), torch.randn(t, hkv, HEAD_DIM), torch.randn(t, hkv, HEAD_DIM)
    cos, sin = rope_cos_sin(torch.tensor([0, 5, 6, 7, 30, 31, 100]), 10000.0, 1.0, HEAD_DIM, torch.float32)
    cache = PagedKVCache.allocate(1, 6, 4, hkv, HEAD_DIM, torch.float32, fill=float("nan"))
    slots = torch.tensor([3, 9, 10, 11, 0, 1, 22])
    ref = PagedKVCache.allocate(1, 6, 4, hkv, HEAD_DIM, torch.float32, fill=float("nan"))
    ref.write(0, apply_rope(k, cos, sin), v, slots)
    q_rot = rope_and_store(q, k, v, cos[:, 0], sin[:, 0], cache.k[0], cache.v[0], slots)
    torch.testing.assert_close(q_rot, apply_rope(q, cos, sin), rtol=0, atol=1e-6)
    for got, want in ((cache.k[0], ref.k[0]), (cache.v[0], ref.v[0])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, equal_nan=True)  # NaN stays NaN elsewhere


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("width", [64, 48])  # 48: not a power of two (masked lanes)
def test_add_rms_norm_matches_the_model_norms(gemma: bool, width: int) -> None:
    torch.manual_seed(width)
    x, h = torch.randn(5, width), torch.randn(5, width) * 3
    norm_h, norm_out = RMSNorm(width, 1e-6, gemma), RMSNorm(width, 1e-6, gemma)
    for n in (norm_h, norm_out):
        n.weight.data.normal_(mean=0.0 if gemma else 1.0, std=0.3)
    _, only = add_rms_norm(x, None, None, norm_out.weight, 1e-6, gemma)  # a plain norm
    torch.testing.assert_close(only, norm_out(x), rtol=1e-5, atol=1e-5)
    s, y = add_rms_norm(x, h, None, norm_out.weight, 1e-6, gemma)  # Llama: x + h, then norm
    torch.testing.assert_close(s, x + h)
    torch.testing.assert_close(y, norm_out(x + h), rtol=1e-5, atol=1e-5)
    s, y = add_rms_norm(x, h, norm_h.weight, norm_out.weight, 1e-6, gemma)  # Gemma's sandwich
    torch.testing.assert_close(s, x + norm_h(h), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, norm_out(x + norm_h(h)), rtol=1e-5, atol=1e-5)
    s, _ = add_rms_norm(x, h, norm_h.weight, None, 1e-6, gemma)  # the layer's last add
    torch.testing.assert_close(s, x + norm_h(h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gelu", [True, False])
def test_act_and_mul_matches_torch(gelu: bool) -> None:
    torch.manual_seed(1)
    gate, up = torch.randn(3, 1500) * 4, torch.randn(3, 1500)  # 4500 elements: not a multiple of the block
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    torch.testing.assert_close(act_and_mul(gate, up, gelu), act * up, rtol=1e-5, atol=1e-5)
