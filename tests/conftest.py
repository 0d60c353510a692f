"""Shared fixtures: tiny random transformers models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch

VOCAB = 96


def tiny_config(kind: str = "llama"):
    """Returns a config for a 2-block model of the given architecture family."""
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "mistral":
        return MistralConfig(**common)
    if kind == "gemma3":
        return Gemma3TextConfig(**common, head_dim=12, sliding_window=16)
    if kind == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=48, ffn_dim=112, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256,
                         word_embed_proj_dim=48)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0):
    """Builds a seeded random causal LM of the given family, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind)).eval()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def calib_ids():
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


def tiny_tokenizer():
    """A whitespace word-level tokenizer over the words ``w0 .. w{VOCAB-2}`` (ids 1..)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(VOCAB - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def word_text(n: int, seed: int = 0) -> str:
    """Returns ``n`` seeded random words the tiny tokenizer knows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 1, (n,), generator=g).tolist()
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama saved as a Hugging Face folder with a tokenizer."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(word_text(3000))
    return path
