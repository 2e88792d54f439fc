"""The quantized linears against a float reference built from their own quantized values, on
shapes that are not multiples of the group size (nor of the kernels' tiles), and the
quantize -> dequantize error within its bound."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from step08_quant.linears import Bf16Linear, Int4Linear, Int8Linear, QuantEmbedding, quantize_int4, quantize_int8

SHAPES = [(300, 200), (48, 72), (257, 640)]  # (out N, in K): N % 16 and K % group size both != 0


def weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g) * 0.1,
            torch.randn(5, k, generator=g))  # weight, bias, 5 rows of activations


def close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 output: relative error of the result's scale (one bf16 rounding plus bf16 inputs)."""
    tol = 2e-2 * float(ref.abs().max()) + 1e-3
    assert float((y.float() - ref).abs().max()) <= tol


@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_linear_matches_its_dequantized_weight(n: int, k: int) -> None:
    w, b, x = weights(n, k)
    lin = Int8Linear(w, b)
    q, s = quantize_int8(w)
    ref = x.bfloat16().float() @ (q.float() * s.bfloat16().float()[:, None]).t() + b.bfloat16().float()
    close(lin(x.bfloat16()), ref)
    assert lin(x.bfloat16()).shape == (5, n)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_matches_its_dequantized_weight(n: int, k: int, group: int) -> None:
    w, b, x = weights(n, k)
    lin = Int4Linear(w, b, group)
    q, s, z = quantize_int4(w, group)  # [N, Kp] 0..15, [N, G] scales and zeros
    deq = ((q.view(n, -1, group).float() - 8) * s.bfloat16().float()[..., None]
           + z.bfloat16().float()[..., None]).view(n, -1)[:, :k]
    ref = x.bfloat16().float() @ deq.t() + b.bfloat16().float()
    close(lin(x.bfloat16()), ref)
    assert torch.allclose(lin.dequantize(), deq, rtol=1e-2, atol=1e-4)  # the packing holds those values (bf16)


@pytest.mark.parametrize("n,k", SHAPES)
def test_quantize_dequantize_error_is_within_half_a_step(n: int, k: int) -> None:
    w, _, _ = weights(n, k, seed=1)
    q, s = quantize_int8(w)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()
    for group in (32, 128):
        q4, s4, z4 = quantize_int4(w, group)
        deq = ((q4.view(n, -1, group).float() - 8) * s4[..., None] + z4[..., None]).view(n, -1)[:, :k]
        step = s4.repeat_interleave(group, dim=1)[:, :k]
        assert ((deq - w).abs() <= step / 2 + 1e-6).all()
        assert q4.min() >= 0 and q4.max() <= 15


def test_int4_keeps_a_group_of_sixteen_levels_exactly() -> None:
    """A group already on a 16-level grid (what a Q4_K GGUF block holds) comes back unchanged."""
    levels = torch.arange(16).float() * 0.01 - 0.07
    w = levels[torch.randint(0, 16, (32, 128))]
    w[:, 0], w[:, 1] = levels[0], levels[15]  # each group spans the grid
    w[:, 32], w[:, 33], w[:, 64], w[:, 65], w[:, 96], w[:, 97] = (levels[0], levels[15]) * 3
    q, s, z = quantize_int4(w, 32)
    deq = ((q.view(32, -1, 32).float() - 8) * s[..., None] + z[..., None]).view(32, -1)
    assert torch.allclose(deq, w, atol=1e-6)


def test_bf16_linear_is_the_rounded_weight() -> None:
    w, b, x = weights(300, 200)
    lin = Bf16Linear(w, b)
    ref = x.bfloat16().float() @ w.bfloat16().float().t() + b.bfloat16().float()
    close(lin(x), ref)
    assert lin.dequantize().dtype == torch.float32 and torch.equal(lin.dequantize(), w.bfloat16().float())


def test_tied_embedding_reads_the_heads_int8_rows() -> None:
    w, _, _ = weights(300, 200)
    head = Int8Linear(w, None)
    emb = QuantEmbedding(head)
    ids = torch.tensor([0, 7, 299, 7])
    rows = emb(ids)
    assert rows.dtype == torch.bfloat16 and rows.shape == (4, 200)
    assert torch.allclose(rows.float(), head.dequantize()[ids], rtol=1e-2, atol=1e-4)
    assert emb.source.qweight is head.qweight  # the same bytes, not a copy


def test_rejects_an_int4_group_size_it_has_no_kernel_for() -> None:
    with pytest.raises(ValueError, match="quantization_group_size"):
        Int4Linear(torch.randn(16, 64), None, 48)


def test_a_linear_without_bias_stays_without_bias() -> None:
    lin = nn.Linear(64, 32, bias=False)
    for q in (Int8Linear(lin.weight, None), Int4Linear(lin.weight, None, 32), Bf16Linear(lin.weight, None)):
        assert q.bias is None


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 1024), (48, 64)])  # (48, 64): a tiny model's K, fewer CUDA k-tiles
@pytest.mark.parametrize("cls", ["int8", "int4"])
def test_the_cuda_kernels_match_the_cpu_ones(cls: str, shape: tuple[int, int]) -> None:
    w, b, x = weights(*shape)
    make = (lambda w, b: Int8Linear(w, b)) if cls == "int8" else (lambda w, b: Int4Linear(w, b, 32))
    cpu = make(w, b)(x.bfloat16()).float()
    gpu = make(w.cuda(), b.cuda())(x.bfloat16().cuda()).float().cpu()
    close(gpu, cpu)
