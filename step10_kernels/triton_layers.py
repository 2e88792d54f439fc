"""``--kernels triton``: the attention backend and the layer runner built from the Triton kernels.

Central rule: the same layers and weights as ``shared.model`` (the runner calls their linear
modules, so step 08's quantized linears work too); only what happens between the matmuls is
replaced, by the fused kernels of :mod:`.triton_ops` and the paged attention of
:mod:`.triton_attention`. Per layer: norm (1 kernel), q/k/v projections, q/k norms (2), RoPE and
the KV store (1), attention (1, or 2 when the KV range is split), output projection, add + norm (1),
gate/up, act-and-mul (1), down, add (+ norm for Gemma: 1). Plain torch: about 40 ops plus a gather.

On a CPU, Triton runs only under ``TRITON_INTERPRET=1`` (numpy, exact and very slow): the tests run
this runner that way; serving on a CPU uses ``--kernels compile``.
"""
from __future__ import annotations

import torch
from torch import nn

from shared.attention import AttentionMetadata
from shared.kv_cache import BlockStorage, KVCache
from shared.model import DecoderLayer, Rope, Transformer
from step10_kernels.triton_attention import TritonPlan, block_m_for, paged_attention, plan_attention
from step10_kernels.triton_ops import act_and_mul, add_rms_norm, rope_and_store

MAX_SPLITS = 16


class TritonAttentionBackend:
    """An ``AttentionBackend``: plan once per forward and window, then one kernel per layer.

    ``num_splits``: KV splits of a pure-decode batch (0: chosen per batch so that sequences x KV
    heads x splits fills ``target_programs`` programs, e.g. two per GPU SM; 1 on a CPU)."""

    def __init__(self, num_splits: int = 0, target_programs: int = 0) -> None:
        if num_splits and num_splits & (num_splits - 1):
            raise ValueError(f"num_splits: must be a power of two, got {num_splits}")
        self.num_splits, self.target_programs = num_splits, target_programs

    @classmethod
    def for_device(cls, device: torch.device, num_splits: int = 0) -> TritonAttentionBackend:
        """Splits chosen to give a CUDA device two programs per SM (none on a CPU)."""
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        return cls(num_splits, target_programs=2 * sms)

    def splits_for(self, md: AttentionMetadata, num_kv_heads: int, block_size: int) -> int:
        if self.num_splits:
            return self.num_splits
        programs = md.num_seqs * num_kv_heads
        if not self.target_programs or programs >= self.target_programs:
            return 1
        want = -(-self.target_programs // programs)
        most = max(md.max_decode_seq_len // (4 * block_size), 1)  # at least 4 blocks per split
        splits = 1
        while splits * 2 <= min(want, most, MAX_SPLITS):
            splits *= 2
        return splits

    def plan(self, md: AttentionMetadata, cache: KVCache, num_tokens: int, sliding_window: int | None,
             num_queries_per_kv: int) -> TritonPlan:
        assert isinstance(cache, BlockStorage)
        splits = self.splits_for(md, cache.k[0].shape[2], cache.block_size)
        return plan_attention(md, sliding_window, num_queries_per_kv, block_m_for(num_queries_per_kv), splits)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                plan: TritonPlan, scale: float, softcap: float | None) -> torch.Tensor:
        """The backend protocol (k already rotated): store k/v, then attend."""
        cache.write(layer, k, v, plan.slot_mapping)
        return self.attend(q, cache, layer, plan, scale, softcap)

    def attend(self, q: torch.Tensor, cache: KVCache, layer: int, plan: TritonPlan, scale: float,
               softcap: float | None) -> torch.Tensor:
        assert isinstance(cache, BlockStorage)
        return paged_attention(q.contiguous(), cache, layer, plan, scale, softcap, block_m_for(plan.group))


class TritonLayers:
    """A :class:`shared.model.LayerRunner` over the fused kernels (needs :class:`TritonAttentionBackend`)."""

    def run(self, layers: nn.ModuleList, x: torch.Tensor, ropes: list[Rope], plans: list[TritonPlan],
            cache: KVCache, backend: TritonAttentionBackend) -> torch.Tensor:  # type: ignore[override]
        assert isinstance(cache, BlockStorage)
        for i, layer in enumerate(layers):
            x = self.layer(layer, x, ropes[i], cache, i, plans[i], backend)
        return x

    @staticmethod
    def layer(lyr: DecoderLayer, x: torch.Tensor, rope: Rope, cache: BlockStorage, i: int, plan: TritonPlan,
              backend: TritonAttentionBackend) -> torch.Tensor:
        a, gemma, eps = lyr.self_attn, lyr.gemma, lyr.input_layernorm.eps
        t = x.shape[0]
        _, h = add_rms_norm(x, None, None, lyr.input_layernorm.weight, eps, gemma)
        q = a.q_proj(h).view(t, -1, a.head_dim)  # [T, H, D]
        k = a.k_proj(h).view(t, -1, a.head_dim)  # [T, Hkv, D]
        v = a.v_proj(h).view(t, -1, a.head_dim)
        if a.q_norm is not None:
            _, q = add_rms_norm(q, None, None, a.q_norm.weight, eps, True)
            _, k = add_rms_norm(k, None, None, a.k_norm.weight, eps, True)
        cos, sin = rope
        q = rope_and_store(q, k, v, cos[:, 0], sin[:, 0], cache.k[i], cache.v[i], plan.slot_mapping)
        out = backend.attend(q, cache, i, plan, a.scale, a.softcap)  # [T, H, D]
        o = a.o_proj(out.reshape(t, -1))  # [T, hidden]
        if gemma:  # x + norm(o), then the pre-MLP norm
            x, h = add_rms_norm(x, o, lyr.post_attention_layernorm.weight, lyr.pre_feedforward_layernorm.weight, eps, True)
        else:  # x + o, then the pre-MLP norm (named post_attention_layernorm in Llama)
            x, h = add_rms_norm(x, o, None, lyr.post_attention_layernorm.weight, eps, False)
        m = lyr.mlp
        y = m.down_proj(act_and_mul(m.gate_proj(h), m.up_proj(h), m.gelu))
        if gemma:
            return add_rms_norm(x, y, lyr.post_feedforward_layernorm.weight, None, eps, True)[0]
        return add_rms_norm(x, y, None, None, eps, False)[0]


def use_triton_kernels(model: Transformer, backend: TritonAttentionBackend) -> Transformer:
    """Transform ``model`` in place: Triton paged attention and the fused-kernel layer runner."""
    model.backend, model.layer_runner = backend, TritonLayers()
    return model
