"""``--kernels compile``: torch.compile (inductor) fuses the math between attention calls.

Central rule: attention stays the backend's (eager torch here, a Triton kernel on a GPU), because
its inputs change shape with every batch and its plan is not a tensor; everything a layer does
before it (norm, projections, q/k norms, RoPE: :meth:`DecoderLayer.before_attention`) and after it
(output projection, residuals, norms, MLP: ``after_attention``) is compiled ONCE, with the token
count dynamic, and the same compiled code serves every layer (their weights are inputs, not
constants) and every batch. vLLM compiles the same pieces (its "piecewise" graphs split at
attention); inductor writes C++/OpenMP loops on CPU (Triton on GPU) that fuse the elementwise ops
and reductions between the matmuls: each RMSNorm becomes one loop instead of ~8 ops, RoPE one
instead of 4, GELU-times-up one instead of 2.

The matmuls are extern calls inductor does not trace into, and each picks its kernel by the rows
it gets (:class:`ShapeDispatchedLinear`, measured on this CPU: README): one row goes to MKL's GEMV on
the dense weight, more rows to oneDNN's GEMM on a prepacked copy (step 04's transform,
:mod:`shared.cpu_linear`, through a custom op since inductor cannot lower a prepacked weight).

Recompiles: dynamo specializes sizes 0 and 1, so a batch of one token gets its own graph and any
other count shares a dynamic one: two graphs per piece. :func:`step10_kernels.model_runner.warm_up`
compiles both at start-up and says so on the console; the compile time and graph count are on
``/health``; a test checks that serving compiles nothing more.

Left out (each measured, README): attention written as torch code for inductor to fuse the block
gather into (slower than gather + SDPA here), the whole forward as one graph (6 % faster, but
130 s of compiling), max-autotune GEMM templates, CUDA graphs (``cuda_graphs.py``, Triton path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.attention import AttentionBackend
from shared.cpu_linear import OneDNNLinear, onednn_usable
from shared.kv_cache import KVCache
from shared.model import DecoderLayer, Rope, Transformer


@torch.library.custom_op("stepserve::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``x [rows, in]`` times a oneDNN-prepacked weight: an op inductor calls but does not trace into."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class ShapeDispatchedLinear(nn.Module):
    """A linear layer with two kernels chosen per call by the number of rows (measured: README):
    one row through MKL's GEMV on the dense weight, more through oneDNN's prepacked GEMM."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the dense weight: shared, not copied
        self.packed = OneDNNLinear(linear).packed  # oneDNN's blocked copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if lead.numel() == 1:  # known when dynamo traces (it specializes one row): plain aten.mm
            return F.linear(x, self.weight, self.bias)
        out_features, in_features = self.weight.shape
        return onednn_linear(x.reshape(-1, in_features), self.packed, self.bias, out_features).view(*lead, out_features)


def _first(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return layer.before_attention(x, (cos, sin))


def _between(prev: DecoderLayer, nxt: DecoderLayer, x: torch.Tensor, attn: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = prev.after_attention(x, attn)
    return (x, *nxt.before_attention(x, (cos, sin)))


def _last(prev: DecoderLayer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    return prev.after_attention(x, attn)


class CompiledLayers:
    """A :class:`shared.model.LayerRunner`: compiled piece, eager attention, compiled piece, ...

    The pieces are the code between two attention calls: the first layer's ``before_attention``;
    each layer's ``after_attention`` fused with the next one's ``before_attention``; the last
    layer's ``after_attention``. Three functions compiled once, 19 calls per forward for 18 layers
    (one per layer boundary: measured 3 % faster than two per layer, whose dynamo entry costs ate
    half of what fusion saved: README)."""

    def __init__(self) -> None:
        # Round where eager rounds (bf16 activations): compiled bf16/int8 output then equals eager's
        # at one row, measured; without it inductor keeps fused intermediates in float32.
        opts = {"emulate_precision_casts": True}
        self.first = torch.compile(_first, dynamic=True, options=opts)
        self.between = torch.compile(_between, dynamic=True, options=opts)
        self.last = torch.compile(_last, dynamic=True, options=opts)

    def run(self, layers: nn.ModuleList, x: torch.Tensor, ropes: list[Rope], plans: list[object], cache: KVCache,
            backend: AttentionBackend) -> torch.Tensor:
        n = len(layers)
        q, k, v = self.first(layers[0], x, *ropes[0])
        for i in range(n):
            attn = layers[i].self_attn
            out = backend.forward(q, k, v, cache, i, plans[i], attn.scale, attn.softcap)  # [T, H, D]
            if i + 1 < n:
                x, q, k, v = self.between(layers[i], layers[i + 1], x, out, *ropes[i + 1])
            else:
                x = self.last(layers[i], x, out)
        return x


def compile_layers(model: Transformer, dispatch_linears: bool) -> int:
    """Transform ``model`` in place: the layers driven by :class:`CompiledLayers`, and with
    ``dispatch_linears`` every float32 ``nn.Linear`` on a CPU with oneDNN a :class:`ShapeDispatchedLinear`
    (quantized linears stay step 08's). Returns how many were swapped. Compilation happens on
    first use (``model_runner.warm_up``)."""
    swapped = 0
    for module in list(model.modules()) if dispatch_linears else []:
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and onednn_usable(child.weight.device, child.weight.dtype):
                setattr(module, name, ShapeDispatchedLinear(child))
                swapped += 1
    model.layer_runner = CompiledLayers()
    return swapped


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
