"""The anchored objective (``objective="anchored"``): each layer cut again at its rank, in
forward order, by min ‖W X − W′ X′‖ with X its original inputs and X′ the compressed model's."""

from __future__ import annotations

import json

import pytest
import torch

import rankcut
from rankcut.core import linalg
from rankcut.errors import ConfigError
from rankcut.methods import make_config
from rankcut.nn.modules import LowRankLinear

from .conftest import tiny_model
from .test_cli import _compress
from .test_update import _layer_io


def _anchored(calib_ids, method="svd-llm", **settings):
    model = tiny_model("llama")
    report = rankcut.compress(model, make_config(method, ratio=0.5, objective="anchored",
                                                 **settings), calib_ids, batch_size=4)
    return model, report


def test_every_layer_is_the_anchored_optimum_for_the_inputs_the_final_model_gives_it(calib_ids):
    """Each layer's factors solve the anchored problem for X′ as the final model has them
    (the layers before it, in its own block too, already cut again), and the logged error
    is the one of the final model."""
    model, report = _anchored(calib_ids)
    original = tiny_model("llama")
    names = [entry["module"] for entry in report.anchor_log]
    assert names and set(names) == {n for n, m in model.named_modules()
                                    if isinstance(m, LowRankLinear)}
    got, wanted = _layer_io(model, names, calib_ids), _layer_io(original, names, calib_ids)
    for entry in report.anchor_log:
        name = entry["module"]
        x_prime, out = (t.flatten(0, 1) for t in got[name])
        x, target = (t.flatten(0, 1) for t in wanted[name])
        error = (target - out).square().sum(-1).mean().item()
        assert error == pytest.approx(entry["error_after"], rel=2e-3, abs=1e-7), name
        assert entry["error_after"] < entry["error_before"], name
        weight = original.get_submodule(name).weight.double()
        whitening = linalg.cholesky_whitening(x_prime.T @ x_prime / len(x))
        optimum = linalg.decompose(weight, input_whitening=whitening,
                                   cross=x.T @ x_prime / len(x))
        w_u, w_v = optimum.factors(model.get_submodule(name).rank)
        # compared on the inputs: X′ of o_proj is nearly singular here (256 tokens, damped
        # λ = 1e-6), so float32 activations summed in another order move W′ by ~1e-3 of
        # the output's scale along weakly reached directions; a wrong cut moves it by O(1)
        best = x_prime @ (w_u @ w_v).T
        torch.testing.assert_close(out, best, rtol=0, atol=5e-3 * float(best.abs().max()),
                                   msg=name)


def test_anchored_model_is_closer_to_the_original_than_the_plain_cut(calib_ids):
    model, report = _anchored(calib_ids)
    plain = tiny_model("llama")
    plain_report = rankcut.compress(plain, make_config("svd-llm", ratio=0.5), calib_ids,
                                    batch_size=4)
    assert report.rank_map == plain_report.rank_map  # the same ranks, cut again
    assert report.settings["objective"] == "anchored"
    with torch.no_grad():
        reference = tiny_model("llama")(input_ids=calib_ids).logits
        gaps = [(m(input_ids=calib_ids).logits - reference).square().mean() for m in (model,
                                                                                     plain)]
    assert gaps[0] < gaps[1]


def test_anchored_keeps_a_global_allocation(calib_ids):
    """io-svd's ranks stay as its selection chose them; only the factors change."""
    model, report = _anchored(calib_ids, "io-svd")
    plain = tiny_model("llama")
    plain_report = rankcut.compress(plain, make_config("io-svd", ratio=0.5), calib_ids,
                                    batch_size=4)
    assert report.rank_map == plain_report.rank_map
    assert len(report.anchor_log) == sum(rank is not None
                                         for rank in report.rank_map.values())


def test_io_svd_cuts_again_in_its_output_metric(calib_ids, monkeypatch):
    """io-svd's anchored cut gets each layer's output whitening T (m×m, from the KL metric
    its ranks were chosen with) and logs its error in that metric; svd-llm's gets none."""
    from rankcut.compression import blockpass

    seen = {}

    def spy(model, name, weight, moments, metric=None):
        seen[name] = metric
        return anchor_layer(model, name, weight, moments, metric)

    anchor_layer = blockpass.anchor_layer
    monkeypatch.setattr(blockpass, "anchor_layer", spy)
    model, report = _anchored(calib_ids, "io-svd")
    assert set(seen) == {e["module"] for e in report.anchor_log}
    for name, metric in seen.items():
        rows = model.get_submodule(name).out_features
        assert metric is not None and metric.root.shape == (rows, rows), name
    assert all(e["error_after"] <= e["error_before"] for e in report.anchor_log)
    assert any(e["error_after"] < 0.99 * e["error_before"] for e in report.anchor_log)
    seen.clear()
    _anchored(calib_ids)
    assert seen and all(metric is None for metric in seen.values())


def test_anchored_settings_are_validated():
    with pytest.raises(ConfigError, match="unknown objective"):
        make_config("svd-llm", objective="anchor")
    with pytest.raises(ConfigError, match="correction stages"):
        make_config("zero-sum", objective="anchored", stages=2)
    with pytest.raises(ConfigError, match="int8"):
        make_config("io-svd", objective="anchored", remap="classic")
    with pytest.raises(ConfigError, match="objective"):
        make_config("asvd", objective="anchored")


def test_cli_objective_anchored_writes_its_log(model_dir, calib_file, tmp_path):
    run = tmp_path / "run.json"
    assert _compress(model_dir, calib_file, tmp_path / "o", "--method", "svd-llm",
                     "--objective", "anchored", "--json", str(run)) == 0
    figures = json.loads(run.read_text())
    assert figures["settings"]["objective"] == "anchored"
    assert figures["anchor_log"] and all(e["error_after"] <= e["error_before"]
                                         for e in figures["anchor_log"])
