"""Linear layers on oneDNN with prepacked weights: a model transform for float32 on CPU.

What it is: :func:`use_onednn_linears` swaps every ``nn.Linear`` of a model for an
:class:`OneDNNLinear` whose weight was reordered ONCE into oneDNN's blocked layout for a given
batch size (``torch.ops.mkldnn._reorder_linear_weight``, the packing torch's inductor uses on CPU),
and which multiplies dense activations with it (``torch.ops.mkldnn._linear_pointwise``): no
per-call weight reorder and no dense <-> oneDNN conversion of the activations.

Why: serving multiplies skinny activations (one row per running sequence) by large weights, and
on the 2-core AMD EPYC (AVX2) MKL's sgemm behind ``F.linear`` is slow for those shapes. Gemma 3
270M's tied LM head, ``[16, 640] x [640, 262144]``: 143 ms with ``F.linear``, 149 ms with
``torch.utils.mkldnn``'s linear (converts activations every call), 114 ms prepacked here; a whole
batch-16 decode step 595 / 368 / 287 ms, batch 4 410 / 232 / 154 ms, batch 1 the same within noise
(about 125 ms, memory-bound). The packing hint was measured too: packed for 16 or 64 rows is as
fast as the best for every batch from 1 to 256; packed for 1 row loses 40 % at 4 rows.

Exactness: the same float32 products summed in another order; logits move by about 1e-4 and
greedy tokens stay transformers' (tested). Cost: the packed weights are a copy (a tied LM head
gets its own: 671 MB for Gemma 3 270M). Chosen when the engine is built; the model never checks.

Left out: fused post-ops (oneDNN can fuse GELU into the gate projection, but its GELU differs from
torch's in the last bits), bfloat16 (no native bf16 on this AVX2 CPU: slower than float32).
"""
from __future__ import annotations

import torch
from torch import nn

BATCH_HINT = 16  # rows the weight layout is tuned for (see the module docstring)


def onednn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """True where this transform applies: CPU, float32, a torch built with oneDNN."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class OneDNNLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` prepacked for oneDNN; ``x`` is any ``[..., in_features]``."""

    def __init__(self, linear: nn.Linear, batch_hint: int = BATCH_HINT) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias,
                                               "none", [], "")  # [rows, out_features]
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_onednn_linears(model: nn.Module, batch_hint: int = BATCH_HINT) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an :class:`OneDNNLinear`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, OneDNNLinear(child, batch_hint))
    return model
