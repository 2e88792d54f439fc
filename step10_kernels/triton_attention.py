"""Paged attention in Triton: one kernel for decodes, prefills, prefill chunks and verification.

Central rule: K/V are read IN PLACE from the block pool through each sequence's block table; no
gathered copy. A program owns ``BLOCK_M`` query tokens of one sequence and the ``G`` query heads of
one KV head (GQA: the rows of the tile are ``BLOCK_M x G`` query vectors sharing each K/V load),
and walks the KV blocks its queries may see, one pool block per iteration, with an online softmax
(FlashAttention's running max ``m``, sum ``l`` and accumulator) in float32. Causality, the sliding
window and the sequence's length are masks on positions; slots outside them are never loaded
(masked loads), so a pool full of NaN outside the written slots cannot leak in (tested).

Decodes of long sequences split their KV range over ``num_splits`` programs (flash-decoding) so a
GPU has enough programs to fill its SMs; each writes a partial ``(acc, m, l)`` and
:func:`_reduce_splits` combines them. vLLM's ``triton_unified_attention`` has the same two paths.

Left out: FP8 KV scales, ALiBi, attention sinks, the tiles of several KV blocks per iteration that
a tuned GPU kernel would load (one block of ``--block-size`` tokens per iteration here).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from shared.attention import AttentionMetadata
from shared.kv_cache import BlockStorage


@triton.jit
def _paged_attention(q_ptr, k_cache, v_cache, out_ptr, acc_ptr, ml_ptr, block_tables, query_start_loc, seq_lens,
                     scale, softcap, window, num_q_tiles, num_tokens, num_heads,
                     stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_co, stride_ch, stride_bt,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                     NUM_SPLITS: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0) // num_q_tiles
    tile = tl.program_id(0) % num_q_tiles
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens + seq)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M * GROUP_P)  # row r: token tile * BLOCK_M + r // GROUP_P, head r % GROUP_P
    tok = tile * BLOCK_M + rows // GROUP_P
    head = kv_head * GROUP + rows % GROUP_P
    row_ok = (tok < q_len) & (rows % GROUP_P < GROUP)
    q_pos = context + tok  # [R]
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [R, D]

    # The KV blocks this tile's queries may see: up to its last query, from its first query's window.
    hi = tl.minimum(context + (tile + 1) * BLOCK_M, seq_len)
    lo = 0
    if SLIDING:
        lo = tl.maximum(context + tile * BLOCK_M - window + 1, 0)
    first, last = lo // BLOCK_SIZE, tl.cdiv(hi, BLOCK_SIZE)
    per_split = tl.cdiv(last - first, NUM_SPLITS)
    b0 = first + split * per_split
    b1 = tl.minimum(b0 + per_split, last)

    m_i = tl.full([BLOCK_M * GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_P], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_P, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for b in range(b0, b1):
        block = tl.load(block_tables + seq * stride_bt + b)
        kv_pos = b * BLOCK_SIZE + n  # [N]
        kv_ok = (n < BLOCK_SIZE) & (kv_pos < seq_len)
        offs = block * stride_cb + n[:, None] * stride_co + kv_head * stride_ch + d[None, :]
        mask = kv_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache + offs, mask=mask, other=0.0).to(q.dtype)  # [N, D]
        v = tl.load(v_cache + offs, mask=mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [R, N] float32
        if SOFTCAP:
            s = (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0) * softcap  # tanh(s / cap) * cap
        allowed = kv_ok[None, :] & (kv_pos[None, :] <= q_pos[:, None])
        if SLIDING:
            allowed = allowed & (kv_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    token = q_start + tok
    if NUM_SPLITS == 1:
        out = acc / tl.where(row_ok, l_i, 1.0)[:, None]  # padding rows saw nothing: no 0 / 0
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:  # partials [splits, T, H, BLOCK_D] and (m, l) [splits, T, H, 2]
        part = (split * num_tokens + token) * num_heads + head
        tl.store(acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _reduce_splits(acc_ptr, ml_ptr, out_ptr, num_tokens, num_heads, stride_ot, stride_oh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """One (token, head) per program: rescale each split's partial to the common max, sum, divide."""
    token, head = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    part = (s * num_tokens + token) * num_heads + head  # [S]
    m = tl.load(ml_ptr + part * 2)
    l = tl.load(ml_ptr + part * 2 + 1)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))  # splits that saw no block weigh 0
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(acc_ptr + part[:, None] * BLOCK_D + d[None, :])  # [S, D]
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@dataclasses.dataclass(frozen=True, slots=True)
class TritonPlan:
    """What one forward's attention calls share: the metadata, the window, the launch shape."""

    slot_mapping: torch.Tensor  # [T]
    query_start_loc: torch.Tensor  # [N + 1] int32
    seq_lens: torch.Tensor  # [N] int32
    block_tables: torch.Tensor  # [N, max_blocks] int32
    num_q_tiles: int
    window: int | None
    group: int
    num_splits: int


def plan_attention(md: AttentionMetadata, window: int | None, group: int, block_m: int, num_splits: int) -> TritonPlan:
    """int32 copies of the metadata (what the kernel indexes with) and the tile count: made once per
    forward per window and shared by every layer of that kind."""
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    splits = num_splits if md.max_query_len == 1 else 1  # split only pure decodes (flash-decoding)
    return TritonPlan(slot_mapping=md.slot_mapping, query_start_loc=i32(md.query_start_loc), seq_lens=i32(md.seq_lens),
                      block_tables=i32(md.block_tables), num_q_tiles=triton.cdiv(md.max_query_len, block_m),
                      window=window, group=group, num_splits=splits)


def block_m_for(group: int) -> int:
    """Query tokens per tile: rows = tokens x padded group >= 16 (tl.dot's smallest M on a GPU)."""
    return max(16 // triton.next_power_of_2(group), 1)


def paged_attention(q: torch.Tensor, cache: BlockStorage, layer: int, plan: TritonPlan, scale: float,
                    softcap: float | None, block_m: int) -> torch.Tensor:
    """``q [T, H, D]`` attends to the pool's keys/values of layer ``layer`` -> ``[T, H, D]``."""
    t, h, dim = q.shape
    k_cache, v_cache = cache.k[layer], cache.v[layer]  # [blocks, block_size, Hkv, D]
    nb, bs, hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    block_d = triton.next_power_of_2(dim)
    splits = plan.num_splits
    acc = ml = out  # unused unless the KV range is split
    if splits > 1:
        acc = torch.empty(splits * t * h * block_d, dtype=torch.float32, device=q.device)
        ml = torch.empty(splits * t * h * 2, dtype=torch.float32, device=q.device)
    grid = (plan.seq_lens.shape[0] * plan.num_q_tiles, hkv, splits)
    _paged_attention[grid](
        q, k_cache, v_cache, out, acc, ml, plan.block_tables, plan.query_start_loc, plan.seq_lens,
        scale, softcap or 1.0, plan.window or 0, plan.num_q_tiles, t, h,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), plan.block_tables.stride(0),
        HEAD_DIM=dim, BLOCK_D=block_d, GROUP=plan.group, GROUP_P=triton.next_power_of_2(plan.group),
        BLOCK_M=block_m, BLOCK_SIZE=bs, BLOCK_N=triton.next_power_of_2(bs), NUM_SPLITS=splits,
        SLIDING=plan.window is not None, SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if splits > 1:
        _reduce_splits[(t, h)](acc, ml, out, t, h, out.stride(0), out.stride(1),
                               HEAD_DIM=dim, BLOCK_D=block_d, NUM_SPLITS=splits)
    return out
