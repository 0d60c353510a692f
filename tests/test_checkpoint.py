"""Checkpoints: round trip, transformers integration, loud failures, atomic writes."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankcut
from rankcut.errors import CheckpointError
from rankcut.io.checkpoint import validate_checkpoint

from .conftest import tiny_model, tiny_tokenizer


@pytest.fixture
def compressed(calib_ids):
    model = tiny_model("qwen2")  # q/k/v biases exercise the bias path
    rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.3), calib_ids)
    return model


@pytest.fixture
def saved(compressed, tmp_path):
    return rankcut.save_pretrained(compressed, tmp_path / "ck", tiny_tokenizer())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("loader", ["rankcut", "transformers"])
def test_round_trip_gives_bit_identical_logits(compressed, saved, calib_ids, loader):
    reference = _logits(compressed, calib_ids[:2])
    if loader == "rankcut":
        loaded = rankcut.from_pretrained(saved)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(saved)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, rankcut.LowRankLinear)
    assert torch.equal(_logits(loaded, calib_ids[:2]), reference)
    # W_u is kept column-major after loading too (the fast decode layout)
    for module in loaded.modules():
        if isinstance(module, rankcut.LowRankLinear):
            assert module.weight_u.stride()[0] == 1


def test_config_carries_the_rank_map(compressed, saved):
    entry = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "rankcut"
    assert entry["format_version"] == 1
    assert entry["method"] == "svd-llm"
    assert entry["target_ratio"] == 0.3
    assert entry["rank_map"] == compressed.config.quantization_config["rank_map"]
    assert 0.25 < entry["achieved_ratio"] < 0.35


def test_sharded_checkpoint_round_trips(compressed, calib_ids, tmp_path):
    out = rankcut.save_pretrained(compressed, tmp_path / "sharded", max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    loaded = rankcut.from_pretrained(out)
    assert torch.equal(_logits(loaded, calib_ids[:2]), _logits(compressed, calib_ids[:2]))


def test_loading_without_rankcut_fails_loudly(saved):
    code = ("from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(saved)!r})\n"
            "print('LOADED')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "LOADED" not in proc.stdout
    assert "ignore_mismatched_sizes" in proc.stderr


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        rankcut.from_pretrained(tmp_path / "nope")


def test_corrupt_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is corrupt"):
        rankcut.from_pretrained(saved)


def test_truncated_shard(saved):
    shard = saved / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated|is truncated"):
        rankcut.from_pretrained(saved)


def test_missing_shard(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        rankcut.from_pretrained(saved)


def test_unknown_format_version(saved):
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format_version 99"):
        validate_checkpoint(saved)


def test_dense_folder_is_not_a_rankcut_checkpoint(tmp_path):
    path = tmp_path / "dense"
    tiny_model().save_pretrained(path)
    with pytest.raises(CheckpointError, match="is not a rankcut checkpoint"):
        rankcut.from_pretrained(path)


def test_saving_an_uncompressed_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="compress it first"):
        rankcut.save_pretrained(tiny_model(), tmp_path / "x")


def test_interrupted_save_leaves_old_checkpoint_intact(compressed, saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("simulated interruption while writing the tokenizer")

    monkeypatch.setattr(type(tiny_tokenizer()), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        rankcut.save_pretrained(compressed, saved, tiny_tokenizer())
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir()] == ["ck"]  # no partial folder left


def test_interrupted_first_save_leaves_nothing_that_looks_complete(compressed, tmp_path,
                                                                   monkeypatch):
    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(compressed), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        rankcut.save_pretrained(compressed, tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma3", "opt"])
def test_round_trip_on_other_architectures(kind, calib_ids, tmp_path):
    model = tiny_model(kind)
    rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.3), calib_ids)
    loaded = AutoModelForCausalLM.from_pretrained(rankcut.save_pretrained(model, tmp_path / kind))
    assert sum(isinstance(m, rankcut.LowRankLinear) for m in loaded.modules()) > 0
    assert torch.equal(_logits(loaded, calib_ids[:2]), _logits(model, calib_ids[:2]))
