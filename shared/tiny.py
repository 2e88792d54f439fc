"""Tiny random-weight models and a byte-level tokenizer, built in memory for tests.

Nothing is read from disk or the network. The weights come from a fixed seed, so every process
builds bit-identical models. ``initializer_range`` is raised from transformers' 0.02 so that the
random logits are spread out: near-ties between the top two tokens would let harmless float
reordering (batching, padding) flip a greedy choice and hide real bugs behind flaky ones.
"""
from __future__ import annotations

import torch

from shared.chat_template import GEMMA_CHAT_TEMPLATE

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
TINY_VOCAB = len(SPECIAL_TOKENS) + 256
TINY_CONTEXT = 512
TINY_SLIDING_WINDOW = 16
_SEED = 1234
# Chosen by measurement (greedy outputs varied, top-2 logit gap >= 0.01 over 60 tokens): with tied
# embeddings and Gemma's sqrt(hidden) embedding scale, the input token wins every step unless the
# post-attention / post-feed-forward norms scale the layer outputs up.
_INIT_RANGE = {"tiny-llama": 0.5, "tiny-gemma3": 0.2}
_POST_NORM_MEAN = 8.0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def tiny_tokenizer() -> object:
    """One token per UTF-8 byte plus Gemma-like special tokens; adds ``<bos>`` like Gemma."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = len(SPECIAL_TOKENS) + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    return fast


def tiny_config(name: str) -> object:
    from transformers import Gemma3TextConfig, LlamaConfig

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  head_dim=16, max_position_embeddings=TINY_CONTEXT, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2, initializer_range=_INIT_RANGE[name])
    if name == "tiny-llama":
        return LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=False, **common)
    if name == "tiny-gemma3":
        layer_types = ["sliding_attention"] * 5 + ["full_attention"]
        return Gemma3TextConfig(num_hidden_layers=6, num_key_value_heads=1, query_pre_attn_scalar=16,
                                sliding_window=TINY_SLIDING_WINDOW, layer_types=layer_types, **common)
    raise ValueError(f"model: unknown tiny model {name!r}")


def tiny_model(name: str) -> torch.nn.Module:
    """The random-weight model ``name``, identical in every process (fixed seed)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Randomize the norm weights too (Gemma's scale is 1 + w and starts at w = 0, Llama's
        # starts at 1), so a norm applied wrongly shows up in the outputs.
        for pname, p in model.named_parameters():
            if "norm" in pname:
                mean = 1.0 if name == "tiny-llama" else (_POST_NORM_MEAN if ".post_" in pname else 0.0)
                p.data.normal_(mean=mean, std=0.2)
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()
