"""Weight-only quantized linear layers: int8 per output channel, int4 in groups along the input.

Central rule: the weight is quantized ONCE (here, at start-up) and every call multiplies bf16
activations by the stored low-precision weight through one fused torch kernel that dequantizes
inside the matmul: no float copy of the weight ever exists after quantization. Each class can
``dequantize()`` itself, which is the float reference the tests compare the kernel against.

* :class:`Int8Linear`: ``w ~= q * s``, ``q`` int8 ``[N, K]``, one scale per output channel
  (absmax / 127, symmetric). Kernel: ``torch._weight_int8pack_mm`` (CPU and CUDA); ``K`` padded to a
  multiple of 16 (the CPU kernel crashes on others). Per channel
  and not grouped because that is the layout the fused kernel takes; grouped int8 would need a
  dequantize-then-matmul path, slower than bf16 (measured: README).
* :class:`Int4Linear`: ``w ~= (q - 8) * s + z`` per group of ``group_size`` input columns, ``q``
  in 0..15 (asymmetric: min/max of the group), ``s`` and ``z`` bf16 ``[K / gs, N, 2]``.
  Kernel: ``_weight_int4pack_mm_for_cpu`` over ``_convert_weight_to_int4pack_for_cpu``'s packing
  on CPU, ``_weight_int4pack_mm`` over ``_convert_weight_to_int4pack`` on CUDA. ``K`` that is not
  a multiple of the group size is padded with zero columns (and the activations with zeros), ``N``
  to a multiple of 16 with zero rows (the packing's tile; the extra outputs are cut).
* :class:`Bf16Linear`: the weight in bfloat16 through ``F.linear`` (oneDNN's bf16 gemm on a CPU
  with avx512_bf16 / AMX).

Left out: activation quantization (W8A8: needs calibration, and decode is bound by weight
bytes, not by arithmetic), int4 with float32 activations (the vectorized x86 kernels take bf16
only; float32 falls to a scalar path slower than a float32 matmul), GPTQ / AWQ error-correcting
rounding (round-to-nearest here; the quality table says what that costs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZES = (32, 64, 128, 256)
N_MULTIPLE = 16  # the int4 packing's tile of output channels
K_MULTIPLE = 16  # _weight_int8pack_mm crashes (segfault, torch 2.13 CPU) on K % 16 != 0: pad


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q [N, K] int8, scales [N] float32)`` with ``w ~= q * s``."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [N]
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group_size`` columns (``K`` padded with zeros to a multiple).

    Returns ``(q [N, Kp] int32 in 0..15, scales [N, G], zeros [N, G])`` float32, with
    ``w ~= (q - 8) * scale + zero`` (torch's int4pack convention).
    """
    n, k = w.shape
    kp = -(-k // group_size) * group_size
    wg = F.pad(w.float(), (0, kp - k)).view(n, kp // group_size, group_size)  # [N, G, gs]
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)  # [N, G]
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((wg - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    zeros = lo + 8.0 * scales  # (q - 8) * s + z == q * s + lo
    return q.view(n, kp), scales, zeros


class Bf16Linear(nn.Module):
    """``F.linear`` with the weight in bfloat16; activations are cast to bf16 if they are not."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight.detach().to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()


class Int8Linear(nn.Module):
    """int8 weight per output channel, bf16 activations, one fused kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scales = quantize_int8(weight.detach())
        self.padded_in = -(-self.in_features // K_MULTIPLE) * K_MULTIPLE
        self.qweight = F.pad(q, (0, self.padded_in - self.in_features)).contiguous()  # [N, padded K] int8
        self.scales = scales.to(torch.bfloat16)  # [N]
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        y = torch._weight_int8pack_mm(x, self.qweight, self.scales)  # [rows, N] bf16
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.qweight[:, :self.in_features].float() * self.scales.float()[:, None]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the dequantized weight (a tied embedding reads the LM head's int8)."""
        return self.qweight[ids, :self.in_features].to(torch.bfloat16) * self.scales[ids][:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, per_channel"


class Int4Linear(nn.Module):
    """int4 weight in groups of ``group_size`` input columns, bf16 activations, one fused kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> None:
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quantization_group_size: int4 takes one of {INT4_GROUP_SIZES}, got {group_size}")
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        w = weight.detach()
        self.padded_out = -(-self.out_features // N_MULTIPLE) * N_MULTIPLE  # the packing takes N % 16 == 0
        q, scales, zeros = quantize_int4(F.pad(w, (0, 0, 0, self.padded_out - self.out_features)), group_size)
        self.padded_in = q.shape[1]
        self.cuda = weight.device.type == "cuda"
        if self.cuda:  # the CUDA packing takes two nibbles per byte, uint8 [N, Kp / 2] (torchao's convention),
            # in tiles of inner_k_tiles x 16 input columns: 8 where K allows, fewer for small K (a tiny model's 64)
            nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            tiles = next(t for t in (8, 4, 2) if self.padded_in % (16 * t) == 0)  # Kp is a multiple of 32
            self.packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles)  # int32 tiles
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)  # uint8 [N, Kp / 2]
        # [G, N, 2]: (scale, zero) per group and output channel, the kernels' layout
        self.scales_and_zeros = torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))  # zero columns meet zero weights
        mm = torch.ops.aten._weight_int4pack_mm if self.cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x, self.packed, self.group_size, self.scales_and_zeros)  # [rows, padded N] bf16
        if self.padded_out != self.out_features:
            y = y[:, :self.out_features].contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float weight the kernel multiplies by, ``[N, K]`` (from the packed weight itself)."""
        eye = torch.eye(self.padded_in, dtype=torch.bfloat16, device=self.scales_and_zeros.device)
        mm = torch.ops.aten._weight_int4pack_mm if self.cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        w = mm(eye, self.packed, self.group_size, self.scales_and_zeros).float().t()  # [padded N, padded K]
        return w[:self.out_features, :self.in_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class QuantEmbedding(nn.Module):
    """A tied embedding that reads its rows from the quantized LM head (int8: the same bytes), or
    from its own int8 copy where the head's packing cannot be gathered (int4)."""

    def __init__(self, source: Int8Linear) -> None:
        super().__init__()
        self.source = source
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.source.embed(ids)  # [T, hidden] bf16

