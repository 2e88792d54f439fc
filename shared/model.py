"""ONE decoder-only transformer in plain torch for the Llama family and Gemma 3.

What this adds: the model the engines run from step 04 on, with its own KV cache, matching
transformers' numerics (same order of operations and dtype casts) on the same weights. Gemma 3:
sliding-window and global layers with their own RoPE bases, q/k norms, sandwich norms, ``1 + w``
RMSNorm in float32, embeddings scaled by sqrt(hidden), ``query_pre_attn_scalar``, GELU-tanh MLP,
tied head, optional logit softcapping. Llama: RMSNorm, SiLU MLP, GQA, tied or untied head.

Central rule: explicit data flow. ``forward(input_ids [T], positions [T], kv_cache, attn_metadata,
logits_indices)`` gets everything it reads or writes as arguments: the packed tokens of any mix of
prefills and decodes, a cache object (:mod:`shared.kv_cache`) and the metadata saying where each
token's K/V goes and what each sequence reads (:mod:`shared.attention`). No globals, no state
between calls. Later steps transform this model (quantize linears, shard heads, swap the attention
backend or the layer runner); the model never checks for them. Parameter names are transformers'
(minus ``model.``), so checkpoints load as they are.

Left out: RoPE scalings other than default/linear, multimodal Gemma, training, dropout, and fused
QKV / gate-up projections (fewer ops per layer, but names, quantization and TP stay one-to-one
with the checkpoint this way).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from shared.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend
from shared.kv_cache import KVCache

FAMILIES = {"llama": "llama", "gemma3_text": "gemma3"}


@dataclasses.dataclass(frozen=True, slots=True)
class ModelArgs:
    """The architecture, read from a transformers config by :meth:`from_hf_config`."""

    family: str  # "llama" | "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str  # "silu" | "gelu_pytorch_tanh"
    rope_thetas: tuple[float, ...]  # per layer
    rope_factors: tuple[float, ...]  # per layer; linear RoPE scaling divides inv_freq by it
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    attn_scale: float
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}")
        if not len(self.rope_thetas) == len(self.rope_factors) == len(self.sliding_windows) == self.num_layers:
            raise ValueError("rope_thetas, rope_factors, sliding_windows: need one entry per layer")

    @property
    def is_gemma(self) -> bool:
        return self.family == "gemma3"

    @classmethod
    def from_hf_config(cls, config: object) -> ModelArgs:
        config = getattr(config, "text_config", config)
        family = FAMILIES.get(config.model_type)
        if family is None:
            raise ValueError(f"model_type: {config.model_type!r} is not one of {sorted(FAMILIES)}")
        n = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * n
        rope = config.rope_parameters
        per_type = {t: rope[t] if t in rope else rope for t in set(layer_types)}
        for t, params in per_type.items():
            if params.get("rope_type", "default") not in ("default", "linear"):
                raise ValueError(f"rope_parameters[{t!r}].rope_type: {params['rope_type']!r} unsupported")
        gemma = family == "gemma3"
        return cls(
            family=family, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_layers=n, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads, head_dim=head_dim, rms_norm_eps=config.rms_norm_eps,
            hidden_act=config.hidden_activation if gemma else config.hidden_act,
            rope_thetas=tuple(float(per_type[t]["rope_theta"]) for t in layer_types),
            rope_factors=tuple(float(per_type[t].get("factor", 1.0)) if per_type[t].get("rope_type") == "linear"
                               else 1.0 for t in layer_types),
            sliding_windows=tuple(config.sliding_window if t == "sliding_attention" else None
                                  for t in layer_types),
            attn_scale=(config.query_pre_attn_scalar if gemma else head_dim) ** -0.5,
            attn_logit_softcap=getattr(config, "attn_logit_softcapping", None),
            final_logit_softcap=getattr(config, "final_logit_softcapping", None),
            tie_word_embeddings=bool(config.tie_word_embeddings),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            max_position_embeddings=config.max_position_embeddings)


class RMSNorm(nn.Module):
    """Llama: ``w * norm(x).to(dtype)``. Gemma (``unit_offset``): ``(norm(x) * (1 + w)).to(dtype)``."""

    def __init__(self, dim: int, eps: float, unit_offset: bool) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.to(x.dtype)


Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sign-folded sin: [T, 1, D] each


def rope_cos_sin(positions: torch.Tensor, theta: float, factor: float, head_dim: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin ``[T, 1, D]`` for :func:`apply_rope`, in float32 like transformers.

    transformers computes ``x * cos + cat(-x2, x1) * sin``; we fold the minus into ``sin`` and
    compute ``x * cos + cat(x2, x1) * sin_rot``: bitwise the same, four ops instead of nine.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * (inv_freq.to(positions.device) / factor)  # [T, D / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    half = head_dim // 2
    sin_rot = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return cos[:, None], sin_rot[:, None]  # [T, 1, D]: broadcast over heads


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]`` rotated (rotate-half convention) by :func:`rope_cos_sin`'s tensors."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_rot


class Attention(nn.Module):
    """The attention block's weights and its math before the attention itself (:meth:`qkv`); the
    layer calls the backend and the output projection (:meth:`DecoderLayer.after_attention`)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.scale, self.softcap = args.attn_scale, args.attn_logit_softcap
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=bias)
        self.q_norm = self.k_norm = None
        if args.is_gemma:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, unit_offset=True)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, unit_offset=True)

    def qkv(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, ...]:
        """Projections, q/k norms and RoPE: ``q [T, H, D]``, ``k``/``v [T, Hkv, D]``."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, -1, self.head_dim)  # [T, H, D]; -1 so that TP-sharded heads work
        k = self.k_proj(x).view(t, -1, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(t, -1, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, *rope), apply_rope(k, *rope), v


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if args.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"hidden_act: {args.hidden_act!r} is not 'silu' or 'gelu_pytorch_tanh'")
        self.gelu = args.hidden_act == "gelu_pytorch_tanh"
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Llama: x + attn(norm(x)); x + mlp(norm(x)). Gemma adds a norm after each sub-block.

    Names follow transformers: in Llama ``post_attention_layernorm`` is the norm *before* the MLP;
    in Gemma it normalizes the attention output and ``pre_feedforward_layernorm`` precedes the MLP.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        eps, gemma = args.rms_norm_eps, args.is_gemma
        self.gemma = gemma
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, eps, gemma)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps, gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps, True)
            self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps, True)

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache, layer: int,
                plan: object, backend: AttentionBackend) -> torch.Tensor:
        # Three stages, so that a kernels transform (step 10) can compile or fuse the two around attention.
        q, k, v = self.before_attention(x, rope)
        out = backend.forward(q, k, v, cache, layer, plan, self.self_attn.scale, self.self_attn.softcap)  # [T, H, D]
        return self.after_attention(x, out)

    def before_attention(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, ...]:
        return self.self_attn.qkv(self.input_layernorm(x), rope)

    def after_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The output projection, residuals, norms and MLP: the layer's output ``[T, hidden]``."""
        h = self.self_attn.o_proj(attn.reshape(x.shape[0], -1))  # [T, hidden]
        if not self.gemma:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class LayerRunner(Protocol):
    """Runs the decoder layers over ``x`` (layer ``i`` with ``ropes[i]`` and ``plans[i]``). The
    reference is :class:`EagerLayers`; step 10's compiled and fused runners are others, chosen when
    the engine is built (like the attention backend), so the model never checks for them."""

    def run(self, layers: nn.ModuleList, x: torch.Tensor, ropes: list[Rope], plans: list[object], cache: KVCache,
            backend: AttentionBackend) -> torch.Tensor: ...


class EagerLayers:
    """Each layer's ``forward`` in turn."""

    def run(self, layers: nn.ModuleList, x: torch.Tensor, ropes: list[Rope], plans: list[object], cache: KVCache,
            backend: AttentionBackend) -> torch.Tensor:
        for i, layer in enumerate(layers):
            x = layer(x, ropes[i], cache, i, plans[i], backend)
        return x


class Transformer(nn.Module):
    """Embedding, decoder layers, final norm, LM head. See the module docstring for the data flow."""

    def __init__(self, args: ModelArgs, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.args = args
        self.backend: AttentionBackend = backend or TorchAttentionBackend()  # chosen when the engine is built
        self.layer_runner: LayerRunner = EagerLayers()  # how the layers are driven: step 10 compiles or fuses
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.is_gemma)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                attn_metadata: AttentionMetadata, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[len(logits_indices), vocab]`` (all ``T`` tokens when ``logits_indices`` is None).

        Writes the K/V of the ``T`` new tokens into ``kv_cache`` at ``attn_metadata.slot_mapping``.
        """
        hidden = self.hidden_states(input_ids, positions, kv_cache, attn_metadata)
        return self.compute_logits(hidden, logits_indices)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                      attn_metadata: AttentionMetadata) -> torch.Tensor:
        """The last layer's output ``[T, hidden]``, before the final norm."""
        args = self.args
        x = self.embed_tokens(input_ids)  # [T, hidden]
        if args.is_gemma:  # scale in the model dtype, as transformers does
            x = x * torch.tensor(args.hidden_size ** 0.5).to(x.dtype)
        # RoPE tables and attention plans once per forward per kind of layer, not per layer.
        rope_kinds = list(zip(args.rope_thetas, args.rope_factors, strict=True))
        ropes = {kind: rope_cos_sin(positions, *kind, args.head_dim, x.dtype) for kind in set(rope_kinds)}
        group = args.num_heads // args.num_kv_heads
        plans = {w: self.backend.plan(attn_metadata, kv_cache, input_ids.shape[0], w, group)
                 for w in set(args.sliding_windows)}
        return self.layer_runner.run(self.layers, x, [ropes[kind] for kind in rope_kinds],
                                     [plans[w] for w in args.sliding_windows], kv_cache, self.backend)

    def compute_logits(self, hidden: torch.Tensor, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and LM head on the rows that need logits only (the head dominates decode)."""
        if logits_indices is not None:
            hidden = hidden[logits_indices]  # [N, hidden]
        logits = self.lm_head(self.norm(hidden))  # [N, vocab]
        cap = self.args.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @classmethod
    def from_hf_model(cls, hf_model: nn.Module, backend: AttentionBackend | None = None) -> Transformer:
        """From an in-memory transformers model; shares its weight tensors (no copy)."""
        args = ModelArgs.from_hf_config(hf_model.config)
        return _build(args, dict(hf_model.state_dict()), backend)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", backend: AttentionBackend | None = None) -> Transformer:
        """From a Hugging Face directory of ``*.safetensors`` (names as transformers saves them)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig

        path = Path(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"path: no *.safetensors files in {path}")
        if not (path / "config.json").exists():
            raise ValueError(f"path: no config.json in {path}")
        args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(path))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update({k: t.to(dtype) for k, t in load_file(f, device=str(device)).items()})
        return _build(args, state, backend)


def _build(args: ModelArgs, state: dict[str, torch.Tensor], backend: AttentionBackend | None) -> Transformer:
    """A Transformer holding ``state`` (transformers' names), built on the meta device: no double copy."""
    state = {k.removeprefix("model."): t for k, t in state.items()}
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(args, backend)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if args.tie_word_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"weights: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)
