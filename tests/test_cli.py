"""The command line end to end on a tiny model folder, and its bad-input messages."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankcut
from rankcut.cli import main

from .conftest import VOCAB, word_text


def _compress(model_dir, calib_file, out, *extra):
    return main(["compress", "--model", str(model_dir), "--calib-file", str(calib_file),
                 "--num-samples", "4", "--seqlen", "32", "--eval-file", str(calib_file),
                 "--eval-seqlen", "64", "--max-windows", "2", "--output", str(out), *extra])


@pytest.fixture
def compressed_dir(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    assert _compress(model_dir, calib_file, out, "--json", str(tmp_path / "run.json")) == 0
    return out


def test_compress_writes_checkpoint_rank_map_and_json(model_dir, calib_file, tmp_path, capsys):
    compressed_dir = tmp_path / "out"
    json_path = str(tmp_path / "run.json")
    assert _compress(model_dir, calib_file, compressed_dir, "--json", json_path) == 0
    figures = json.loads((tmp_path / "run.json").read_text())
    assert figures["method"] == "io-svd" and figures["target_ratio"] == 0.2  # the defaults
    assert 0.2 <= figures["achieved_ratio"] < 0.25  # floor() on tiny 48-wide layers
    assert figures["perplexity"] > 1 and figures["dense_perplexity"] > 1
    assert figures["model_bytes"] < figures["model_bytes_dense"]
    rank_map = json.loads((compressed_dir / "rank_map.json").read_text())
    assert len(rank_map) == 14
    assert json.loads((compressed_dir / "rankcut_run.json").read_text()) == figures
    out = capsys.readouterr().out
    assert "ratio (target / achieved)" in out and "perplexity" in out


def test_info_prints_allocation(compressed_dir, capsys):
    assert main(["info", str(compressed_dir)]) == 0
    out = capsys.readouterr().out
    assert "method: io-svd" in out
    assert "q_proj" in out and "down_proj" in out


def test_eval_of_checkpoint_and_json(compressed_dir, calib_file, tmp_path):
    path = tmp_path / "eval.json"
    assert main(["eval", str(compressed_dir), "--eval-file", str(calib_file), "--seqlen", "64",
                 "--max-windows", "3", "--json", str(path)]) == 0
    figures = json.loads(path.read_text())
    assert figures["windows"] == 3 and figures["tokens"] == 3 * 63
    assert figures["nonfinite_windows"] == []


def test_export_dense_loads_without_rankcut_entry(compressed_dir, tmp_path):
    out = tmp_path / "dense"
    assert main(["export", str(compressed_dir), "--dense", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    dense = AutoModelForCausalLM.from_pretrained(out)
    low = AutoModelForCausalLM.from_pretrained(compressed_dir)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, low(ids).logits, atol=1e-4, rtol=1e-4)


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_wrong_model_path(calib_file, tmp_path, capsys):
    assert _compress(tmp_path / "missing" / "model", calib_file, tmp_path / "o") == 2
    assert "model path not found" in _error(capsys)


def test_folder_without_config(calib_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _compress(tmp_path / "empty", calib_file, tmp_path / "o") == 2
    assert "is not a model folder: it has no config.json" in _error(capsys)


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_ratio_outside_open_interval(model_dir, calib_file, tmp_path, capsys, ratio):
    assert _compress(model_dir, calib_file, tmp_path / "o", "--ratio", ratio) == 2
    assert "ratio must be in the open interval (0, 1)" in _error(capsys)


def test_unsupported_model(calib_file, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from .conftest import tiny_tokenizer

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        path)
    tiny_tokenizer().save_pretrained(path)
    assert _compress(path, calib_file, tmp_path / "o") == 2
    assert "GPT2LMHeadModel is not supported" in _error(capsys)


def test_empty_calibration_text(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    assert _compress(model_dir, empty, tmp_path / "o") == 2
    assert "empty" in _error(capsys)


def test_too_short_calibration_text_says_how_many_tokens(model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(word_text(20))
    assert _compress(model_dir, short, tmp_path / "o") == 2
    assert "calibration text has 20 tokens" in _error(capsys)


def test_corrupt_checkpoint_eval(compressed_dir, calib_file, capsys):
    shard = compressed_dir / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["eval", str(compressed_dir), "--eval-file", str(calib_file)]) == 2
    assert "truncated" in _error(capsys)


def test_failed_run_keeps_previous_output(compressed_dir, model_dir, tmp_path, capsys):
    before = (compressed_dir / "config.json").read_text()
    short = tmp_path / "short.txt"
    short.write_text(word_text(20))
    assert _compress(model_dir, short, compressed_dir) == 2
    assert (compressed_dir / "config.json").read_text() == before


def test_io_svd_flags_and_byte_ratio_in_json(model_dir, calib_file, tmp_path):
    out, json_path = tmp_path / "io", tmp_path / "io.json"
    assert _compress(model_dir, calib_file, out, "--method", "io-svd", "--top-k", "3",
                     "--kl-mode", "exact", "--score", "second", "--remap", "loss-aware",
                     "--ratio", "0.3", "--json", str(json_path)) == 0
    figures = json.loads(json_path.read_text())
    assert figures["settings"]["top_k"] == 3 and figures["settings"]["remap"] == "loss-aware"
    assert figures["settings"]["kl_mode"] == "exact" and figures["settings"]["score"] == "second"
    assert 0.3 <= figures["achieved_byte_ratio"] < 0.31
    entry = json.loads((out / "config.json").read_text())["quantization_config"]
    assert entry["int8_layout"] and entry["achieved_byte_ratio"] == pytest.approx(
        figures["achieved_byte_ratio"], abs=1e-6)


def test_io_svd_flag_on_another_method_is_refused(model_dir, calib_file, tmp_path, capsys):
    assert _compress(model_dir, calib_file, tmp_path / "x", "--method", "zero-sum",
                     "--top-k", "3") == 2
    assert "has no setting(s) ['top_k']" in capsys.readouterr().err


def test_every_config_setting_is_a_flag_that_reaches_its_config():
    """The flags are derived from the config dataclasses (one source of truth): each
    setting of each method and update has its flag, and a value given there arrives."""
    from dataclasses import fields

    from rankcut import cli
    from rankcut.compression.update import UPDATES
    from rankcut.methods import METHODS

    parser = cli.build_parser()
    compress = parser._subparsers._group_actions[0].choices["compress"]
    flags = {option for action in compress._actions for option in action.option_strings}
    for prefix, classes in [("", [s.config_cls for s in METHODS.values()]),
                            *[(f"{name}-", [cls]) for name, cls in UPDATES.items()]]:
        for cls in classes:
            for f in fields(cls):
                flag = "--" + prefix + f.name.replace("_", "-")
                assert flag in flags or not f.metadata["flag"], (cls.name, flag)
    args = parser.parse_args(["compress", "--method", "io-svd", "--min-rank", "3", "--kl-mode",
                              "exact", "--sequential", "--update", "lora", "--lora-alpha", "4",
                              "--seed", "9"])
    with pytest.raises(rankcut.errors.ConfigError, match="cannot run sequentially"):
        cli._compress_settings(args)
    args.sequential = None
    config, update, _ = cli._compress_settings(args)
    assert (config.min_rank, config.kl_mode, config.top_k) == (3, "exact", 5)
    assert config.seed == 0  # --seed samples the calibration; the KL draws keep their own
    assert (update.name, update.alpha, update.rank) == ("lora", 4.0, 8)
    args = parser.parse_args(["compress", "--lora-steps", "3"])
    with pytest.raises(rankcut.errors.ConfigError, match="--lora-steps needs --update lora"):
        cli._compress_settings(args)


def test_runner_checks_a_job_before_any_work(model_dir, tmp_path):
    from rankcut import runner
    from rankcut.compression.update import make_update

    config = rankcut.make_config("svd-llm", ratio=0.3)
    with pytest.raises(rankcut.errors.ConfigError, match="--update lora is not supported"):
        runner.check(runner.CompressJob(config, model=str(model_dir), stream=True,
                                        update=make_update("lora")))
    with pytest.raises(rankcut.errors.ConfigError, match="--num-samples must be at least 1"):
        runner.check(runner.CompressJob(config, model=str(model_dir), num_samples=0))
    job = runner.check(runner.CompressJob(config, model=str(model_dir), seqlen=32,
                                          eval_seqlen=64, output=str(tmp_path / "o")))
    assert job.output == str(tmp_path / "o") and job.uses_calibration
    with pytest.raises(rankcut.errors.ConfigError, match="maximum positions"):
        runner.check(runner.CompressJob(config, model=str(model_dir), seqlen=10**6,
                                        output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(model_dir, calib_file, tmp_path, capsys):
    assert _compress(model_dir, calib_file, tmp_path / "out", "--device", "cuda") == 2
    assert "no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_device_is_a_clear_error(model_dir, calib_file, tmp_path, capsys):
    assert _compress(model_dir, calib_file, tmp_path / "out", "--device", "gpu0") == 2
    assert "is not a device" in capsys.readouterr().err


def test_bfloat16_model_compresses_with_float64_statistics(model_dir, calib_file, tmp_path):
    run = tmp_path / "run.json"
    assert _compress(model_dir, calib_file, tmp_path / "out", "--method", "svd-llm",
                     "--dtype", "bfloat16", "--device", "cpu", "--json", str(run)) == 0
    figures = json.loads(run.read_text())
    assert figures["dtype"] == "bfloat16" and figures["device"] == "cpu"
    assert 1 < figures["perplexity"] < 10 * figures["dense_perplexity"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    factors = [p for n, p in reloaded.named_parameters() if n.endswith("weight_u")]
    assert factors and all(p.dtype == torch.bfloat16 for p in factors)
