"""Fused Triton kernels for the rest of a layer: RoPE + KV store, residual add + RMSNorm, gated act.

Central rule: each kernel does in one pass over memory what plain torch does in several calls, with
the same arithmetic in the same order where it matters for the output (norms in float32, ``1 + w``
for Gemma, the output cast where transformers casts), so greedy tokens stay transformers'.

* :func:`rope_and_store` (nano-vllm's ``store_kvcache``, plus the rotation): rotates q and k with
  the forward's cos / sign-folded sin tables and writes k and v to their slots in the pool. torch:
  4 ops for each of q and k, plus two ``index_copy_``.
* :func:`add_rms_norm` (vLLM's ``fused_add_rms_norm``, with Gemma's sandwich): ``s = x + h`` or
  ``s = x + norm(h)``, then ``norm(s)``; one read of each row, one write of each output. torch:
  about 8 ops per norm.
* :func:`act_and_mul`: ``act(gate) * up`` (GELU-tanh or SiLU) in one pass; torch: 2 ops.

Left out: fusing the norms into the matmuls' prologues, and the q/k norms into the rotation (they
are separate :func:`add_rms_norm` calls on ``[T * H, D]`` rows).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_and_store(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out, k_cache, v_cache, slot_mapping,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
                    stride_cs, stride_ch, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                    BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rolled = (d + HEAD_DIM // 2) % HEAD_DIM  # torch.roll(x, D / 2): x[(d - D/2) mod D] == x[(d + D/2) mod D]
    cos = tl.load(cos_ptr + t * stride_cos + d, mask=d_ok, other=0.0)
    sin = tl.load(sin_ptr + t * stride_sin + d, mask=d_ok, other=0.0)
    h = tl.arange(0, BLOCK_H)
    for kind in tl.static_range(2):  # 0: q (to q_out), 1: k (to the pool)
        n = NUM_HEADS if kind == 0 else NUM_KV_HEADS
        src = q_ptr + t * stride_qt if kind == 0 else k_ptr + t * stride_kt
        sh = stride_qh if kind == 0 else stride_kh
        mask = (h < n)[:, None] & d_ok[None, :]
        x = tl.load(src + h[:, None] * sh + d[None, :], mask=mask, other=0.0)  # [H, D]
        xr = tl.load(src + h[:, None] * sh + rolled[None, :], mask=mask, other=0.0)
        y = x * cos[None, :] + xr * sin[None, :]
        if kind == 0:
            tl.store(q_out + (t * NUM_HEADS + h[:, None]) * HEAD_DIM + d[None, :], y, mask=mask)
        else:
            slot = tl.load(slot_mapping + t)
            written = mask & (h[:, None] * 0 + slot >= 0)  # slot -1: a CUDA graph's padding row, written nowhere
            dst = slot * stride_cs + h[:, None] * stride_ch + d[None, :]
            tl.store(k_cache + dst, y.to(k_cache.dtype.element_ty), mask=written)
            v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
            tl.store(v_cache + dst, v.to(v_cache.dtype.element_ty), mask=written)


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """``q [T, H, D]``, ``k``/``v [T, Hkv, D]``, ``cos``/``sin_rot [T, D]``; the pool
    ``[blocks, block_size, Hkv, D]``. Writes rotated k and v at ``slot_mapping`` (nothing where it is
    -1); returns rotated q."""
    t, h, dim = q.shape
    hkv = k.shape[1]
    q_out = torch.empty((t, h, dim), dtype=q.dtype, device=q.device)
    flat_k, flat_v = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])  # [slots, Hkv, D]
    _rope_and_store[(t,)](q, k, v, cos, sin_rot, q_out, flat_k, flat_v, slot_mapping,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          cos.stride(0), sin_rot.stride(0), flat_k.stride(0), flat_k.stride(1),
                          NUM_HEADS=h, NUM_KV_HEADS=hkv, BLOCK_H=triton.next_power_of_2(max(h, hkv)),
                          HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim))
    return q_out


@triton.jit
def _normalize(x, w, n, eps, UNIT_OFFSET: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """RMSNorm of a float32 row, as shared.model.RMSNorm computes it, cast to the activations' dtype."""
    x = x * (1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps))
    if UNIT_OFFSET:
        return (x * (1.0 + w)).to(OUT_DTYPE)
    return w.to(OUT_DTYPE) * x.to(OUT_DTYPE)


@triton.jit
def _add_rms_norm(x_ptr, h_ptr, wh_ptr, w_ptr, sum_ptr, out_ptr, n, eps,
                  HAS_RESIDUAL: tl.constexpr, NORM_RESIDUAL: tl.constexpr, NORM_OUT: tl.constexpr,
                  UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * n + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        h = tl.load(h_ptr + row * n + offs, mask=ok, other=0.0)
        if NORM_RESIDUAL:  # Gemma's post-norm of the sub-block's output before the add
            wh = tl.load(wh_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            h = _normalize(h.to(tl.float32), wh, n, eps, UNIT_OFFSET, dtype)
        x = (x + h).to(dtype)
        tl.store(sum_ptr + row * n + offs, x, mask=ok)
    if NORM_OUT:
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + offs, _normalize(x.to(tl.float32), w, n, eps, UNIT_OFFSET, dtype), mask=ok)


def add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, h_weight: torch.Tensor | None,
                 weight: torch.Tensor | None, eps: float, unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the last dimension. ``s = x + (norm(h) if h_weight is not None else h)`` (``s = x``
    when ``h`` is None), then ``norm(s)`` with ``weight`` (``s`` itself when ``weight`` is None).
    Returns ``(s, normed)``."""
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    s = x if h is None else torch.empty_like(x)
    out = x if weight is None else torch.empty_like(x)
    hh = x if h is None else h.contiguous()
    _add_rms_norm[(rows,)](x, hh, h_weight if h_weight is not None else x, weight if weight is not None else x,
                           s, out, n, eps, HAS_RESIDUAL=h is not None, NORM_RESIDUAL=h_weight is not None,
                           NORM_OUT=weight is not None, UNIT_OFFSET=unit_offset, BLOCK=triton.next_power_of_2(n))
    return s, out


@triton.jit
def _act_and_mul(gate_ptr, up_ptr, out_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=ok, other=0.0)
    if GELU:  # torch's gelu(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 * tl.sigmoid(2.0 * z))  # 1 + tanh(z) == 2 sigmoid(2 z)
    else:
        a = g * tl.sigmoid(g)
    tl.store(out_ptr + offs, a.to(u.dtype) * u, mask=ok)


def act_and_mul(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """``act(gate) * up``, elementwise, for ``gate``/``up`` of one shape."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(up)
    block = 1024
    _act_and_mul[(triton.cdiv(up.numel(), block),)](gate, up, out, up.numel(), GELU=gelu, BLOCK=block)
    return out
