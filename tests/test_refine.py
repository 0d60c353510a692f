"""Block-wise refinement after truncation (``--update block``)."""

from __future__ import annotations

import json

import pytest
import torch

import rankcut
from rankcut.compression.update import make_update
from rankcut.errors import ConfigError
from rankcut.methods import make_config

from .conftest import VOCAB, tiny_model
from .test_cli import _compress


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (12, 32), generator=torch.Generator().manual_seed(2))


def _refined(ids, method="svd-llm", **settings):
    model = tiny_model("llama")
    update = make_update("block", **{"epochs": 3, "lr": 1e-3, "held_out": 4, "batch_size": 4,
                                     **settings})
    report = rankcut.compress(model, make_config(method, ratio=0.5), ids, batch_size=4,
                              update=update)
    return model, report


def test_a_refined_block_is_never_worse_on_the_held_out_windows(ids):
    model, report = _refined(ids)
    log = report.update.log
    assert [e["block"] for e in log] == [0, 1]
    for entry in log:
        assert len(entry["curve"]) == 4  # before, then after each of the 3 epochs
        assert entry["error_after"] == min(entry["curve"]) <= entry["error_before"]
        assert entry["curve"][entry["best_epoch"]] == entry["error_after"]
    assert any(e["error_after"] < 0.99 * e["error_before"] for e in log)
    assert report.rank_map == {m.name: m.rank for m in report.modules}


def test_a_block_that_does_not_improve_keeps_its_closed_form_factors(ids):
    """A learning rate far too high makes every epoch worse: each block is put back as
    the closed-form cut left it, bit for bit."""
    plain = tiny_model("llama")
    rankcut.compress(plain, make_config("svd-llm", ratio=0.5), ids, batch_size=4)
    model, report = _refined(ids, lr=10.0, epochs=1)
    assert all(e["best_epoch"] == 0 for e in report.update.log)
    expected = plain.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_refinement_is_deterministic_and_the_seed_matters(ids):
    a, report = _refined(ids, batch_size=2)  # 4 training batches: 24 orders per epoch
    assert any(e["best_epoch"] > 0 for e in report.update.log)
    b, _ = _refined(ids, batch_size=2)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    c, _ = _refined(ids, batch_size=2, seed=1)
    assert any(not torch.equal(value, c.state_dict()[key])
               for key, value in a.state_dict().items())


def test_norms_are_tuned_only_when_asked(ids):
    original = tiny_model("llama").state_dict()
    without, _ = _refined(ids)
    with_norms, _ = _refined(ids, norms=True)
    norms = [key for key in original if "norm" in key and key.startswith("model.layers.")]
    assert norms
    assert all(torch.equal(without.state_dict()[k], original[k]) for k in norms)
    assert any(not torch.equal(with_norms.state_dict()[k], original[k]) for k in norms)


def test_block_settings_are_validated(ids):
    with pytest.raises(ConfigError, match="epochs must be at least 1"):
        make_update("block", epochs=0)
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        make_update("block", lr=-1.0)
    with pytest.raises(ConfigError, match="holds out 12 of 12"):
        _refined(ids, held_out=12)


def test_cli_update_block_writes_its_curve(model_dir, calib_file, tmp_path):
    run = tmp_path / "run.json"
    assert _compress(model_dir, calib_file, tmp_path / "o", "--method", "svd-llm",
                     "--update", "block", "--block-epochs", "2", "--block-held-out", "1",
                     "--block-batch-size", "1", "--json", str(run)) == 0
    figures = json.loads(run.read_text())
    assert figures["update"]["name"] == "block" and figures["update"]["epochs"] == 2
    assert figures["update_log"] and all(len(e["curve"]) == 3 for e in figures["update_log"])
