"""Tensor parallelism as a model transform: Megatron-LM's column/row scheme, as vLLM and gpt-fast do it.

Central rule: every rank holds a slice of every layer and runs the same forward on the same
tokens. A layer's first matmul of each block is split by output features (column-parallel:
``q/k/v_proj`` by heads, ``gate/up_proj`` by intermediate features), so each rank computes whole
heads and whole features with no communication; the block's last matmul is split by input
features (row-parallel: ``o_proj``, ``down_proj``), so each rank holds a partial sum of the output
and ONE all-reduce per block makes it whole: two per layer. The vocabulary is split too: the
embedding looks up the ids it owns (zeros elsewhere) and all-reduces once per forward; the LM head
computes its slice of the logits and gathers them on rank 0, which alone samples.

::

    x ─┬─ q/k/v_proj[heads of rank r] ─ attention(local heads, local KV cache) ─ o_proj[:, r] ─┐
       │                                                               all-reduce (sum) ◄──────┘
       └─ gate/up_proj[features of rank r] ─ act·up ─ down_proj[:, r] ─ all-reduce (sum)

K/V heads are split like query heads; where a model has fewer KV heads than ranks (Gemma 3 270M:
one), each rank keeps the one its query heads read (replicated, as vLLM does). Each rank's KV cache
holds only its own KV heads. Sums run in another order than one device's matmul, so outputs may
differ in the last bits (the tests say where that matters).

:func:`apply_tp` is the whole transform of a float model. The engine applies it in its two halves
around step 08's ``quantize`` (shard, then quantize): :func:`shard_model` slices the float model,
then any transform replaces the (now smaller) linears as it would on one device; and
:func:`parallel_vocab` finally wraps whatever embedding and head modules are left, since
``quantize`` rebuilds those two. ``shared/model.py`` never checks for any of it.

The collectives run on the process's default group (``torch.distributed``'s one per process); the
all-reduce is a custom op so that ``torch.compile`` (step 10) keeps it as one opaque call instead
of breaking its graph there.

Left out: sequence parallelism (norms split by tokens), fused QKV / gate-up shards, pipeline
parallelism, and async (overlapped) all-reduces.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shared.model import ModelArgs, Transformer

FLAG = "--tensor-parallel-size"


@torch.library.custom_op("stepserve::tp_all_reduce", mutates_args=())
def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's ``x`` (a new tensor; every rank gets it)."""
    out = x.clone()
    dist.all_reduce(out)
    return out


@tp_all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def check_tp(args: ModelArgs, world_size: int) -> None:
    """A ValueError naming the flag where ``world_size`` ranks cannot split this model evenly."""
    if world_size < 1:
        raise ValueError(f"{FLAG} must be >= 1, got {world_size}")
    if args.num_heads % world_size:
        raise ValueError(f"{FLAG} {world_size} does not divide the model's {args.num_heads} attention heads")
    kv = args.num_kv_heads
    if kv % world_size and world_size % kv:
        raise ValueError(f"{FLAG} {world_size}: the model's {kv} KV heads can be neither split nor replicated "
                         f"evenly (one of the two must divide the other)")
    if args.intermediate_size % world_size:
        raise ValueError(f"{FLAG} {world_size} does not divide the model's intermediate size "
                         f"{args.intermediate_size}")


def local_args(args: ModelArgs, world_size: int) -> ModelArgs:
    """One rank's shapes: its heads, KV heads (at least one) and MLP features; the vocabulary stays
    whole (rank 0's logits are gathered whole)."""
    return dataclasses.replace(args, num_heads=args.num_heads // world_size,
                               num_kv_heads=max(1, args.num_kv_heads // world_size),
                               intermediate_size=args.intermediate_size // world_size)


def vocab_shard(vocab_size: int, world_size: int) -> int:
    """Rows of the vocabulary each rank holds (the last rank's tail is padding)."""
    return -(-vocab_size // world_size)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight``/``bias`` (slices would keep the whole tensor alive)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return lin


def column_parallel(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """Output features ``start:stop``: this rank's heads or MLP features."""
    bias = None if linear.bias is None else linear.bias[start:stop]
    return _linear(linear.weight[start:stop], bias)


class RowParallelLinear(nn.Module):
    """Input features ``start:stop`` of a linear layer, then the all-reduce that sums the ranks'
    partial outputs. The slice is an ordinary linear (``self.linear``), so step 08 can quantize it;
    its bias is added once, on rank 0, before the sum."""

    def __init__(self, linear: nn.Linear, start: int, stop: int, rank: int) -> None:
        super().__init__()
        bias = linear.bias if rank == 0 else None
        self.linear = _linear(linear.weight[:, start:stop], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tp_all_reduce(self.linear(x))  # [T, out]: the whole sum on every rank


def shard_model(model: Transformer, rank: int, world_size: int) -> Transformer:
    """Slice ``model`` (in place) to rank ``rank`` of ``world_size``; its ``args`` become the rank's
    shapes, so a KV cache built from them holds only this rank's KV heads."""
    a = model.args
    check_tp(a, world_size)
    d, hq = a.head_dim, a.num_heads // world_size
    group = a.num_heads // a.num_kv_heads  # query heads per KV head
    kv0 = rank * hq // group  # this rank's first KV head (its only one when KV heads are replicated)
    hkv = max(1, a.num_kv_heads // world_size)
    f = a.intermediate_size // world_size
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = column_parallel(attn.q_proj, rank * hq * d, (rank + 1) * hq * d)  # [hq * D, hidden]
        attn.k_proj = column_parallel(attn.k_proj, kv0 * d, (kv0 + hkv) * d)  # [hkv * D, hidden]
        attn.v_proj = column_parallel(attn.v_proj, kv0 * d, (kv0 + hkv) * d)
        attn.o_proj = RowParallelLinear(attn.o_proj, rank * hq * d, (rank + 1) * hq * d, rank)
        attn.num_heads, attn.num_kv_heads = hq, hkv
        mlp.gate_proj = column_parallel(mlp.gate_proj, rank * f, (rank + 1) * f)  # [f, hidden]
        mlp.up_proj = column_parallel(mlp.up_proj, rank * f, (rank + 1) * f)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, rank * f, (rank + 1) * f, rank)
    _shard_vocab(model, rank, world_size)
    model.args = local_args(a, world_size)
    return model


def _shard_vocab(model: Transformer, rank: int, world_size: int) -> None:
    """The embedding's and the head's rows of this rank, zero-padded to equal shards."""
    n = vocab_shard(model.args.vocab_size, world_size)

    def rows(w: torch.Tensor) -> torch.Tensor:
        part = w[rank * n:(rank + 1) * n]
        return F.pad(part, (0, 0, 0, n - part.shape[0])) if part.shape[0] < n else part

    tied = model.args.tie_word_embeddings
    embed = nn.Embedding(n, model.args.hidden_size, device="meta")
    embed.weight = nn.Parameter(rows(model.embed_tokens.weight).clone(), requires_grad=False)
    model.embed_tokens = embed
    model.lm_head = _linear(embed.weight if tied else rows(model.lm_head.weight), None)
    if tied:
        model.lm_head.weight = embed.weight  # still one tensor


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding: ids it owns are looked up, the others give zeros; the
    all-reduce then holds every id's row (one rank's row plus zeros: exact)."""

    def __init__(self, inner: nn.Module, rank: int, rows: int) -> None:
        super().__init__()
        self.inner, self.start, self.rows = inner, rank * rows, rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = self.inner(local.masked_fill(outside, 0))  # [T, hidden]
        return tp_all_reduce(x.masked_fill(outside[:, None], 0))


class VocabParallelHead(nn.Module):
    """This rank's slice of the logits ``[N, V / world]``, gathered on rank 0 into ``[N, V]``
    (padding cut). The other ranks return their slice, which nobody reads: only rank 0 samples."""

    def __init__(self, inner: nn.Module, rank: int, world_size: int, vocab_size: int) -> None:
        super().__init__()
        self.inner, self.rank, self.world_size, self.vocab_size = inner, rank, world_size, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = self.inner(x).contiguous()  # [N, V / world]
        if self.rank != 0:
            dist.gather(part, None, dst=0)
            return part
        parts = [torch.empty_like(part) for _ in range(self.world_size)]
        dist.gather(part, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :self.vocab_size]  # [N, V]


def parallel_vocab(model: Transformer, rank: int, world_size: int) -> Transformer:
    """Wrap the (possibly quantized) embedding and head of a :func:`shard_model` model (in place)."""
    n = vocab_shard(model.args.vocab_size, world_size)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, rank, n)
    model.lm_head = VocabParallelHead(model.lm_head, rank, world_size, model.args.vocab_size)
    return model


def apply_tp(model: Transformer, rank: int, world_size: int) -> Transformer:
    """The whole transform of a float model (in place): rank ``rank`` of ``world_size``'s slice."""
    return parallel_vocab(shard_model(model, rank, world_size), rank, world_size)
