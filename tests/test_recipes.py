"""Named presets of compression settings (``--recipe``)."""

from __future__ import annotations

import json

import pytest

import rankcut
from rankcut import cli
from rankcut.errors import ConfigError
from rankcut.recipes import RECIPES

from .test_cli import _compress


def _settings(*argv):
    return cli._compress_settings(cli.build_parser().parse_args(["compress", *argv]))


def test_recipe_best_expands_to_explicit_settings_and_explicit_flags_win():
    entry = RECIPES["best"]
    config, update, _ = _settings("--recipe", "best", "--ratio", "0.4")
    assert config.name == entry["method"] and update.name == entry["update"]
    block = update.steps[0]
    assert block.lr == entry["update_settings"]["block_lr"]
    assert block.epochs == entry["update_settings"]["block_epochs"]
    _, update, _ = _settings("--recipe", "best", "--block-epochs", "1", "--lora-steps", "3")
    assert (update.steps[0].epochs, update.steps[1].steps) == (1, 3)
    assert update.steps[0].lr == entry["update_settings"]["block_lr"]
    _, update, _ = _settings("--recipe", "best", "--update", "block")  # e.g. for --stream
    assert update.name == "block" and update.lr == entry["update_settings"]["block_lr"]
    with pytest.raises(ConfigError, match="--recipe best compresses with --method io-svd"):
        _settings("--recipe", "best", "--method", "svd-llm")


def test_recipe_configs_in_python():
    config, update = rankcut.recipe_configs("best", 0.3, block_epochs=2, min_rank=2)
    assert (config.ratio, config.min_rank, update.steps[0].epochs) == (0.3, 2, 2)
    with pytest.raises(ConfigError, match="unknown recipe 'fast'"):
        rankcut.recipe_configs("fast", 0.3)


def test_the_run_record_names_the_recipe_and_spells_it_out(model_dir, calib_file, tmp_path):
    run = tmp_path / "run.json"
    assert _compress(model_dir, calib_file, tmp_path / "o", "--recipe", "best",
                     "--block-epochs", "1", "--block-held-out", "1", "--block-batch-size", "1",
                     "--lora-steps", "1", "--lora-batch-size", "1", "--json", str(run)) == 0
    record = json.loads(run.read_text())
    assert record["recipe"] == "best" and record["method"] == RECIPES["best"]["method"]
    assert [s["name"] for s in record["update"]["steps"]] == ["block", "lora"]
    assert record["update"]["steps"][0]["lr"] == RECIPES["best"]["update_settings"]["block_lr"]
    assert {e["update"] for e in record["update_log"]} == {"block", "lora"}
