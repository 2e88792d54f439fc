"""``quantize(model, scheme)`` on the tiny models: every linear replaced (the tied head too), the
float weights gone, logits near float32's by a measured margin, the scheme chosen by the CPU's
flags, and bad flags refused naming the flag."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from shared.attention import build_batch
from shared.model import Transformer
from step07_paged_kv.paged_cache import PagedKVCache
from step08_quant.linears import Int4Linear, Int8Linear, QuantEmbedding
from step08_quant.quality import held_windows, measure, variants
from step08_quant.quantize import QuantConfig, plan, quantize, resolve_scheme, weight_bytes
from tests.helpers import reference_model, usage_error


def fresh(model: str = "tiny-gemma3") -> Transformer:
    return Transformer.from_hf_model(reference_model(model).model)


def logits(model: Transformer, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    a = model.args
    cache = PagedKVCache.allocate(a.num_layers, 8, 16, a.num_kv_heads, a.head_dim, dtype)
    b = build_batch([ids], [0], [list(range(8))], 16)
    with torch.inference_mode():
        return model(b.input_ids, b.positions, cache, b.attn_metadata, None).float()


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("scheme,linear", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_every_linear_is_replaced_and_the_embedding_is_quantized(scheme: str, linear: type, model_name: str) -> None:
    model = quantize(fresh(model_name), scheme, 32)
    assert not [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert all(isinstance(m, linear) for layer in model.layers for m in layer.modules()
               if isinstance(m, (Int8Linear, Int4Linear)))
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.embed_tokens, QuantEmbedding)  # the head: int8
    tied = model.args.tie_word_embeddings
    assert (model.embed_tokens.source is model.lm_head) == tied  # tied: the head's int8 rows, no second copy
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # what is left: the norms


def test_fewer_bytes_per_scheme() -> None:
    sizes = {s: weight_bytes(quantize(fresh("tiny-llama"), s, 32)) for s in ("none", "bf16", "int8")}
    assert sizes["int8"] < sizes["bf16"] < sizes["none"]


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gemma3"])
def test_quantized_logits_stay_close_to_float32_and_closer_with_more_bits(model_name: str) -> None:
    ids = reference_model(model_name).tokenizer("The capital of France is Paris, and").input_ids
    ref = torch.log_softmax(logits(fresh(model_name), ids, torch.float32), -1)
    kl = {}
    for scheme in ("bf16", "int8", "int4"):
        lp = torch.log_softmax(logits(quantize(fresh(model_name), scheme, 32), ids, torch.bfloat16), -1)
        kl[scheme] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    # random tiny weights (init range 0.5, sharp logits): far looser than the real model's, still 10x apart
    assert kl["bf16"] < 0.1 and kl["int8"] < 0.1, kl
    assert kl["int4"] > 10 * kl["int8"], kl  # 4 bits cost more than 8: the measure tells them apart


def test_none_leaves_the_model_as_it_is() -> None:
    model = fresh()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert quantize(model, "none") is model
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before


def test_auto_picks_by_what_the_cpu_offers() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = QuantConfig()
    assert resolve_scheme(auto, cpu, ("avx2", "avx512f", "avx512_bf16", "avx512_vnni")) == "int8"
    assert resolve_scheme(auto, cpu, ("avx2", "amx_bf16")) == "int8"
    assert resolve_scheme(auto, cpu, ("avx2", "avx512f")) == "none"  # bf16 would be emulated
    assert resolve_scheme(auto, cuda, ()) == "bf16"
    assert resolve_scheme(QuantConfig(quantization="int4"), cpu, ()) == "int4"  # asked for: given


def test_plan_sets_activation_and_kv_dtypes() -> None:
    cpu = torch.device("cpu")
    p = plan(QuantConfig(quantization="int4"), cpu)
    assert (p.scheme, p.group_size, p.activation_dtype, p.kv_cache_dtype) == ("int4", 128, "bfloat16", "bfloat16")
    p = plan(QuantConfig(quantization="none", kv_cache_dtype="bfloat16"), cpu)
    assert (p.activation_dtype, p.kv_cache_dtype) == ("float32", "bfloat16")
    assert "int8pack" in plan(QuantConfig(quantization="int8"), cpu).kernels


@pytest.mark.parametrize("flags,named", [
    (["--quantization", "int9"], "--quantization"),
    (["--quantization", "int4", "--quantization-group-size", "48"], "--quantization-group-size"),
    (["--quantization", "int8", "--quantization-group-size", "64"], "--quantization-group-size"),
    (["--kv-cache-dtype", "float8"], "--kv-cache-dtype"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(flags: list[str], named: str) -> None:
    assert named in usage_error("step08_quant", *flags)


def test_quality_measure_scores_float32_as_itself_and_int4_worse_than_int8() -> None:
    lm = reference_model("tiny-gemma3")
    windows = held_windows(lm.tokenizer, 2, 48)
    assert all(len(w) == 48 and w[0] == lm.tokenizer.bos_token_id for w in windows)
    rows = {q.scheme: q for q in measure(lm, variants(["int8", "int4"], [32]), windows, [windows[0][:20]], 8)}
    none = rows["none"]
    assert none.ppl_ratio == 1.0 and none.mean_kl == 0.0 and none.top1_agreement == 1.0 and none.greedy_prefix == 8
    assert 0 < rows["int8"].mean_kl < rows["int4 g32"].mean_kl
    assert rows["int8"].weight_mb < none.weight_mb
