"""Zero-Sum SVD: first-order scores, the global selection rule, stages and rank maps."""

import json

import pytest
import torch

import rankcut
from rankcut.compression import correction
from rankcut.core import allocation, linalg
from rankcut.errors import ConfigError

from .conftest import VOCAB, tiny_model
from .whole_model import calibration_gradients, calibration_loss

# --- scores against finite differences -------------------------------------------------------


def _input_moments(model, layers, ids):
    stats = {name: linalg.SecondMoment.zeros(layer.in_features) for name, layer in layers.items()}
    handles = [layer.register_forward_hook(lambda m, a, o, s=stats[name]: s.update(a[0]))
               for name, layer in layers.items()]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return {name: s.mean() for name, s in stats.items()}


def test_predicted_loss_change_matches_finite_difference(calib_ids):
    """The five components with the largest predicted |ΔL| in the whole model: dropping
    each alone changes the float64 calibration loss by the predicted amount (sign, 20%)."""
    model = tiny_model().double()
    layers = rankcut.architecture.select_targets(model)
    grads, base = calibration_gradients(model, layers, calib_ids)
    moments = _input_moments(model, layers, calib_ids)
    candidates = []
    for name, layer in layers.items():
        whitening = linalg.cholesky_whitening(moments[name])
        decomposition = linalg.decompose(layer.weight, whitening)
        scores = linalg.component_scores(decomposition, grads[name])
        candidates += [(abs(float(v)), float(v), name, i, decomposition)
                       for i, v in enumerate(scores.tolist())]
    for _, predicted, name, i, dec in sorted(candidates, key=lambda c: -c[0])[:5]:
        layer = layers[name]
        original = layer.weight.detach().clone()
        piece = dec.sigma[i] * torch.outer(dec.u[:, i], dec.vh[i])
        with torch.no_grad():
            layer.weight.sub_(dec.input_whitening.right_inverse(piece))
            measured = calibration_loss(model, calib_ids) - base
            layer.weight.copy_(original)
        assert predicted * measured > 0, (name, i, predicted, measured)
        assert abs(predicted - measured) <= 0.2 * abs(measured), (name, i, predicted, measured)


# --- global selection (pure) -----------------------------------------------------------------

SMOL_SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
               "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}


def _random_problem(blocks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {f"{b}.{k}": s for b in range(blocks) for k, s in SMOL_SHAPES.items()}
    scores = {name: torch.randn(min(s), generator=g, dtype=torch.float64) * 1e-3
              for name, s in shapes.items()}
    return shapes, scores


def _kept(shapes, ranks):
    return sum(m * n if ranks[k] is None else ranks[k] * (m + n) for k, (m, n) in shapes.items())


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_zero_sum_selection_invariants(ratio):
    shapes, scores = _random_problem()
    selection = allocation.global_select(shapes, scores, ratio, rule="zero-sum")
    total = sum(m * n for m, n in shapes.values())
    # budget met, within 0.1% of the target
    achieved = 1 - _kept(shapes, selection.ranks) / total
    assert ratio <= achieved < ratio + 0.001
    # replay the drops: spectral order inside each matrix, the two-heap rule across them
    next_index = {name: min(s) - 1 for name, s in shapes.items()}
    running, largest, bound = 0.0, 0.0, 0.0
    for name, index, delta, after in selection.dropped:
        assert index == next_index[name]  # each matrix drops its smallest σ first
        offered = {k: float(scores[k][i]) for k, i in next_index.items() if i >= 1}
        positive = [abs(v) for v in offered.values() if v >= 0]
        negative = [abs(v) for v in offered.values() if v < 0]
        side = positive if (running <= 0 and positive) or not negative else negative
        assert abs(delta) == min(side) and (delta >= 0) == (side is positive)
        running += delta
        assert after == pytest.approx(running)
        largest = max(largest, abs(delta))
        if positive and negative:  # neither heap ran dry: the drift from zero does not grow
            assert abs(running) <= max(bound, largest)
        bound = max(bound, largest, abs(running))  # a forced drop may widen it
        next_index[name] -= 1
    # the final ranks are what was dropped; a rank at or above break-even is dense
    for name, (m, n) in shapes.items():
        rank = next_index[name] + 1
        expected = rank if rank < linalg.break_even_rank(m, n) else None
        assert selection.ranks[name] == expected


def test_matrix_that_keeps_rank_above_break_even_stays_dense():
    shapes, scores = _random_problem(blocks=1)
    scores["0.q"] = torch.full((576,), 10.0, dtype=torch.float64)  # far too costly to cut
    selection = allocation.global_select(shapes, scores, 0.2, rule="zero-sum")
    assert selection.ranks["0.q"] is None
    dropped = sum(name == "0.q" for name, *_ in selection.dropped)
    assert 576 - dropped >= linalg.break_even_rank(576, 576)


def test_least_sensitive_drops_smallest_magnitude_first():
    shapes, scores = _random_problem(blocks=1)
    selection = allocation.global_select(shapes, scores, 0.3, rule="least-sensitive")
    rank = {name: min(s) for name, s in shapes.items()}
    for name, _, delta, _ in selection.dropped:
        offered = min(abs(float(scores[k][rank[k] - 1])) for k in shapes if rank[k] > 1)
        assert abs(delta) == offered
        rank[name] -= 1


def test_min_rank_floor_and_impossible_budget():
    shapes, scores = _random_problem(blocks=1)
    selection = allocation.global_select(shapes, scores, 0.5, min_rank=40)
    assert all(r is None or r >= 40 for r in selection.ranks.values())
    with pytest.raises(ConfigError, match="cannot remove 95.0% of the parameters with min_rank"):
        allocation.global_select(shapes, scores, 0.95, min_rank=100)


def test_unknown_rule():
    with pytest.raises(ConfigError, match="unknown rule 'greedy'"):
        rankcut.make_config("zero-sum", rule="greedy")


# --- end to end on a tiny model --------------------------------------------------------------


def _zero_sum(calib_ids, include=None, rank_map=None, **settings):
    model = tiny_model()
    config = rankcut.make_config("zero-sum", ratio=settings.pop("ratio", 0.4), **settings)
    return model, rankcut.compress(model, config, calib_ids, include=include, rank_map=rank_map)


def test_zero_sum_gives_heterogeneous_ranks_and_meets_budget(calib_ids):
    model, report = _zero_sum(calib_ids)
    ranks = {r.rank for r in report.modules if r.name.endswith("mlp.up_proj")}
    assert len({r.rank for r in report.modules}) > 3
    assert report.achieved_ratio >= 0.4 and report.achieved_ratio < 0.41
    assert ranks  # up_proj layers are present in the report
    assert model.config.quantization_config["method"] == "zero-sum"


def test_same_seed_same_rank_map(calib_ids):
    assert _zero_sum(calib_ids)[1].rank_map == _zero_sum(calib_ids)[1].rank_map


def test_correction_stages_lower_the_calibration_loss(caplog):
    caplog.set_level("INFO")
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))
    one_model, one = _zero_sum(ids, ratio=0.6)
    model, three = _zero_sum(ids, ratio=0.6, stages=3)
    assert three.rank_map == one.rank_map
    assert len(three.stage_losses) == 3  # on this model and text both stages are kept
    assert three.stage_losses[0] == pytest.approx(calibration_loss(one_model, ids), abs=1e-5)
    assert three.stage_losses[2] < three.stage_losses[1] < three.stage_losses[0]
    for stage in (1, 2, 3):
        assert f"calibration loss after stage {stage}" in caplog.text
    # the final reported loss is the model's real calibration loss
    assert three.stage_losses[-1] == pytest.approx(calibration_loss(model, ids), abs=1e-5)


def test_correction_stages_correct_the_lm_head_too():
    """With the LM head a target, the stages re-cut it with the blocks: the head's factors
    change, and the last reported loss is still the model's real calibration loss."""
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))
    include = ["model.layers.*", "lm_head"]
    ranks = {**_zero_sum(ids, ratio=0.6, include=include)[1].rank_map, "lm_head": 8}
    one_model, one = _zero_sum(ids, ratio=0.6, include=include, rank_map=ranks)
    model, two = _zero_sum(ids, ratio=0.6, stages=2, include=include, rank_map=ranks)
    assert two.rank_map == one.rank_map == ranks  # the global selection keeps the head dense
    assert len(two.stage_losses) == 2 and two.stage_losses[1] < two.stage_losses[0]
    assert not torch.equal(model.lm_head.weight_u, one_model.lm_head.weight_u)
    assert two.stage_losses[-1] == pytest.approx(calibration_loss(model, ids), abs=1e-5)


def test_stage_that_raises_the_loss_is_rejected(calib_ids, monkeypatch, caplog):
    """A step scale far too large makes every trial worse: the stage is dropped and the
    model is exactly the stage-1 model."""
    caplog.set_level("INFO")
    monkeypatch.setattr(correction, "STEP_SCALES", (1e4,))
    one_model, one = _zero_sum(calib_ids)
    model, three = _zero_sum(calib_ids, stages=3)
    assert three.stage_losses == pytest.approx(
        [calibration_loss(one_model, calib_ids)], abs=1e-6)
    assert "stage 2: no step scale lowers the calibration loss" in caplog.text
    assert "stage 3" not in caplog.text
    with torch.no_grad():
        assert torch.equal(model(calib_ids).logits, one_model(calib_ids).logits)


def test_rank_map_reuse_and_mismatch(calib_ids, tmp_path):
    _, report = _zero_sum(calib_ids)
    model = tiny_model()
    again = rankcut.compress(model, rankcut.make_config("svd-llm", ratio=0.4), calib_ids,
                             rank_map=report.rank_map)
    assert again.rank_map == report.rank_map
    bad = dict(report.rank_map)
    bad.pop(next(iter(bad)))
    with pytest.raises(ConfigError, match="rank map does not match the target modules"):
        rankcut.compress(tiny_model(), rankcut.make_config("svd-llm"), calib_ids, rank_map=bad)


def test_cli_rank_map_and_info(model_dir, calib_file, tmp_path, capsys):
    from rankcut.cli import main

    common = ["--model", str(model_dir), "--calib-file", str(calib_file), "--num-samples", "4",
              "--seqlen", "32", "--no-eval"]
    assert main(["compress", *common, "--method", "zero-sum", "--ratio", "0.4",
                 "--output", str(tmp_path / "zs")]) == 0
    rank_map = tmp_path / "zs" / "rank_map.json"
    assert main(["compress", *common, "--rank-map", str(rank_map),
                 "--output", str(tmp_path / "reused")]) == 0
    reused = json.loads((tmp_path / "reused" / "config.json").read_text())
    assert reused["quantization_config"]["method"] == "io-svd"  # the default, with its metric
    assert reused["quantization_config"]["rank_map"] == json.loads(rank_map.read_text())
    capsys.readouterr()
    assert main(["info", str(tmp_path / "zs")]) == 0
    out = capsys.readouterr().out
    assert "per block" in out and "per module type" in out
    missing = tmp_path / "nope.json"
    assert main(["compress", *common, "--rank-map", str(missing),
                 "--output", str(tmp_path / "x")]) == 2
    assert "rank map file not found" in capsys.readouterr().err


def test_gradients_match_autograd_and_leave_the_model_as_it_was(calib_ids):
    """The whole-model reference (tests/whole_model.py) the engine's statistics are tested
    against is itself checked against plain autograd."""
    model = tiny_model()
    layers = rankcut.architecture.select_targets(model)
    grads, loss = calibration_gradients(model, layers, calib_ids, batch_size=3)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules())
    # reference: one plain backward of the mean loss over all tokens
    logits = model(input_ids=calib_ids).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), calib_ids[:, 1:].flatten())
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    for name, layer in layers.items():
        torch.testing.assert_close(grads[name], layer.weight.grad, rtol=1e-4, atol=1e-7)


