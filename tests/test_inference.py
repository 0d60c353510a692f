"""Inference: generation, the speed comparison and its command-line tables."""

import json

import pytest
import torch

import rankcut
from rankcut.cli import main
from rankcut.measure.inference import cache_bytes, compare_speed, time_generation, weight_bytes

from .conftest import tiny_model
from .test_cli import _compress


@pytest.fixture
def compressed_dir(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    assert _compress(model_dir, calib_file, out, "--method", "svd-llm", "--ratio", "0.4",
                     "--no-eval") == 0
    return out


def test_weight_bytes_counts_a_tied_embedding_once():
    model = tiny_model("llama")
    assert model.config.tie_word_embeddings
    params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert weight_bytes(model) == params  # parameters() already yields the tied one once
    embedding = model.get_input_embeddings().weight
    assert weight_bytes(model) < params + embedding.numel() * embedding.element_size()


def test_timed_generation_fills_the_cache_it_reports():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    prefill, decode, size = time_generation(model, ids, new_tokens=5)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    # keys and values: layers × 2 × batch × kv heads × (10 + 5 positions) × dim × 4 bytes
    expected = config.num_hidden_layers * 2 * 2 * config.num_key_value_heads * 15 * head_dim * 4
    assert size == expected and prefill > 0 and decode > 0


def test_compare_speed_reports_every_model_and_shape(calib_ids):
    dense = tiny_model("llama")
    small = tiny_model("llama")
    rankcut.compress(small, rankcut.make_config("svd-llm", ratio=0.4), calib_ids)
    rows = compare_speed({"dense": dense, "compressed": small}, batch_size=2, prompt_len=12,
                         new_tokens=3, repeats=2)
    assert [r.model for r in rows] == ["dense", "compressed"]
    assert rows[1].weight_bytes < rows[0].weight_bytes
    assert rows[0].kv_cache_bytes == rows[1].kv_cache_bytes
    assert all(r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0 for r in rows)


def test_cache_bytes_of_nested_containers():
    a, b = torch.zeros(3, 4), torch.zeros(5)
    assert cache_bytes([(a, b), (a,)]) == (12 + 5) * 4


def test_cli_bench_prints_speedups_and_writes_json(compressed_dir, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", str(compressed_dir), "--batch-sizes", "1", "--prompt-lens", "8", "16",
                 "--new-tokens", "2", "--repeats", "1", "--device", "cpu", "--latent-values",
                 "--json", str(path)]) == 0
    figures = json.loads(path.read_text())
    assert len(figures["rows"]) == 6 and len(figures["speedups"]) == 4
    latent = [s for s in figures["speedups"] if s["model"] == "compressed+latent-v"]
    plain = [s for s in figures["speedups"] if s["model"] == "compressed"]
    assert len(latent) == len(plain) == 2
    for a, b in zip(latent, plain, strict=True):
        assert a["kv_cache_ratio"] < b["kv_cache_ratio"] == 1.0
    assert figures["weight_byte_ratio"] > 1
    assert json.loads((compressed_dir / "rankcut_bench.json").read_text()) == figures
    assert "decode tok/s" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--batch-sizes", "0"], "--batch-sizes must be at least 1"),
    (["--prompt-lens", "8", "-1"], "--prompt-lens must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--new-tokens", "-2"], "--new-tokens must not be negative"),
])
def test_cli_bench_rejects_bad_settings(compressed_dir, capsys, flags, message):
    assert main(["bench", str(compressed_dir), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (compressed_dir / "rankcut_bench.json").exists()


def test_cli_bench_latent_values_need_a_low_rank_v_proj(model_dir, calib_file, tmp_path,
                                                        capsys):
    out = tmp_path / "no-v"
    assert _compress(model_dir, calib_file, out, "--method", "svd", "--exclude", "*.v_proj",
                     "--no-eval") == 0
    assert main(["bench", str(out), "--latent-values", "--prompt-lens", "8"]) == 2
    assert "no low-rank v_proj" in capsys.readouterr().err


def test_cli_bench_needs_a_rankcut_checkpoint(model_dir, capsys):
    assert main(["bench", str(model_dir)]) == 2
    assert "rankcut" in capsys.readouterr().err


def test_cli_generate_streams_greedy_tokens(compressed_dir, capsys):
    assert main(["generate", str(compressed_dir), "--prompt", "w1 w2 w3", "--max-new-tokens",
                 "4", "--no-chat", "--device", "cpu"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", str(compressed_dir), "--prompt", "w1 w2 w3", "--max-new-tokens",
                 "4", "--no-chat", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == first and first.strip()  # greedy: deterministic


def test_cli_generate_with_latent_values_writes_the_same(compressed_dir, capsys):
    args = ["generate", str(compressed_dir), "--prompt", "w5 w6", "--max-new-tokens", "6",
            "--no-chat", "--device", "cpu"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--latent-values"]) == 0
    assert capsys.readouterr().out == plain


def test_cli_generate_rejects_zero_tokens(compressed_dir, capsys):
    assert main(["generate", str(compressed_dir), "--prompt", "w1", "--max-new-tokens",
                 "0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
