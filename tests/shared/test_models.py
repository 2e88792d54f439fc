"""Model sources: the cache location, atomic conversion, the tiny models and their tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared import models
from shared.config import ModelConfig
from shared.tiny import TINY_SLIDING_WINDOW, tiny_model, tiny_tokenizer


def test_cache_dir_follows_env_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "stepserve"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


def test_killed_conversion_leaves_nothing_a_later_start_would_load(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(models, "gguf_path", lambda: tmp_path / "fake.gguf")

    def dies_halfway(source: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # a partial directory...
        raise KeyboardInterrupt  # ...and the process is killed

    monkeypatch.setattr(models, "_convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        models.gemma_hf_dir()
    assert not (tmp_path / "hf" / models.GEMMA_ALIAS).exists()

    monkeypatch.setattr(models, "_convert_gguf", lambda s, out: (out.mkdir(parents=True), (out / "config.json").write_text("{}")))
    assert (models.gemma_hf_dir() / "config.json").exists()


@pytest.mark.parametrize("name", models.TINY_ALIASES)
def test_tiny_models_are_identical_in_every_build(name: str) -> None:
    a, b = tiny_model(name), tiny_model(name)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_tiny_gemma3_has_sliding_and_full_layers() -> None:
    cfg = tiny_model("tiny-gemma3").config
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert cfg.sliding_window == TINY_SLIDING_WINDOW and cfg.tie_word_embeddings


def test_tiny_tokenizer_adds_bos_and_round_trips_bytes() -> None:
    tok = tiny_tokenizer()
    ids = tok("naïve 😀").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "naïve 😀"
    assert "<start_of_turn>user" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_load_model_reports_context_and_eos() -> None:
    lm = models.load_model(ModelConfig(model="tiny-gemma3", max_model_len=100))
    assert lm.max_model_len == 100 and 1 in lm.eos_token_ids and lm.dtype == torch.float32


@pytest.mark.real_model
def test_converted_gemma_tokenizer_adds_bos_and_has_chat_template() -> None:
    tok = models.load_tokenizer(ModelConfig(model="gemma-3-270m"))
    assert tok("Hello").input_ids[0] == tok.bos_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
