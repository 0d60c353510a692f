"""IO-SVD: KL pseudo-gradients, the two-sided metric and its second-order prediction."""

import pytest
import torch

import rankcut
from rankcut.calibration.hooks import InputMomentHooks
from rankcut.compression import engine
from rankcut.core import fisher, linalg
from rankcut.errors import ConfigError

from .conftest import VOCAB, tiny_model
from .whole_model import OutputMetricHooks, calibration_gradients


def _logits(positions=1, vocab=12, seed=0):
    return torch.randn(positions, vocab, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("top_k", [1, 3, 12])
def test_exact_seeds_sum_to_the_top_k_fisher(top_k):
    logits = _logits()
    seeds = [s[0].double() for s in fisher.kl_seeds(logits, top_k, "exact")]
    assert len(seeds) == top_k
    outer = sum(torch.outer(s, s) for s in seeds)
    torch.testing.assert_close(outer, fisher.top_k_fisher(logits[0], top_k))


def test_full_top_k_fisher_is_the_softmax_hessian():
    logits = _logits()[0]
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(fisher.top_k_fisher(logits, logits.numel()),
                               torch.diag(p) - torch.outer(p, p), atol=1e-6, rtol=1e-5)


def test_sampled_seed_is_unbiased():
    logits = _logits().expand(40000, -1)
    generator = torch.Generator().manual_seed(0)
    (seed,) = fisher.kl_seeds(logits, 4, "sample", generator)
    estimate = seed.double().T @ seed.double() / seed.shape[0]
    torch.testing.assert_close(estimate, fisher.top_k_fisher(logits[0], 4), atol=6e-3, rtol=0)


def test_unknown_kl_mode_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown KL mode"):
        next(fisher.kl_seeds(_logits(), 2, "approx"))
    with pytest.raises(ConfigError, match="kl_mode"):
        rankcut.make_config("io-svd", kl_mode="approx")
    with pytest.raises(ConfigError, match="top_k"):
        rankcut.make_config("io-svd", top_k=0)
    with pytest.raises(ConfigError, match="score"):
        rankcut.make_config("io-svd", score="third")


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * n)


@pytest.mark.parametrize("rank", [1, 6, 11])
def test_two_sided_truncation_loss_is_the_metric_norm(rank):
    """½ tr(ΔWᵀ C ΔW R) = ½ Σ dropped σ² for B = Tᵀ W S, and the factors undo T and S."""
    w = torch.randn(16, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r, c = _spd(12, 1), _spd(16, 2)
    dec = linalg.decompose(w, linalg.cholesky_whitening(r), linalg.cholesky_whitening(c))
    w_u, w_v = dec.factors(rank)
    gap = w - w_u @ w_v
    measured = 0.5 * float(torch.trace(gap.T @ c @ gap @ r))
    assert measured == pytest.approx(fisher.predicted_kl(dec.sigma[rank:]), rel=1e-8)
    full_u, full_v = dec.factors(12)
    torch.testing.assert_close(full_u @ full_v, w, atol=1e-9, rtol=1e-9)


def test_two_sided_scores_are_the_first_order_change():
    g = torch.Generator().manual_seed(3)
    w, grad = (torch.randn(10, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dec = linalg.decompose(w, linalg.cholesky_whitening(_spd(8, 4)),
                           linalg.cholesky_whitening(_spd(10, 5)))
    scores = linalg.component_scores(dec, grad)
    for i in range(8):
        kept = torch.ones(8, dtype=torch.float64)
        kept[i] = 0
        u = dec.output_whitening.left_inverse_transpose(dec.u * (dec.sigma * kept))
        without = dec.input_whitening.right_inverse(u @ dec.vh)
        assert float((grad * (without - w)).sum()) == pytest.approx(float(scores[i]), rel=1e-9)


def _kl(p_logits, q_logits):
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_predicted_kl_tracks_the_measured_kl_on_a_tiny_model(calib_ids):
    """With the full-vocabulary Fisher, ½ Σ dropped σ² predicts the KL increase of cutting
    one layer's smallest components (K-FAC approximation: within a factor of 1.5)."""
    model = tiny_model().double()
    layers = rankcut.architecture.select_targets(model)
    outputs = OutputMetricHooks(layers, VOCAB, "exact", seed=0)
    with InputMomentHooks(layers) as inputs, outputs:
        calibration_gradients(model, layers, calib_ids, input_hooks=inputs,
                              output_hooks=outputs)
    with torch.no_grad():
        base = model(input_ids=calib_ids).logits[:, :-1]
    checked = 0
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj",
                 "model.layers.1.self_attn.q_proj"):
        layer = layers[name]
        dec = linalg.decompose(layer.weight, linalg.cholesky_whitening(inputs.stats[name].mean()),
                               linalg.cholesky_whitening(outputs.stats[name].mean()))
        rank = dec.sigma.numel() - 3
        w_u, w_v = dec.factors(rank)
        original = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight.copy_(w_u @ w_v)
            measured = _kl(base, model(input_ids=calib_ids).logits[:, :-1])
            layer.weight.copy_(original)
        predicted = fisher.predicted_kl(dec.sigma[rank:])
        assert predicted / 1.5 < measured < predicted * 1.5, (name, predicted, measured)
        checked += 1
    assert checked == 3


def test_second_order_score_alone_skips_the_loss_gradient():
    make = rankcut.make_config
    assert not make("io-svd").needs_loss_gradients  # default score: second
    assert make("io-svd", score="both").needs_loss_gradients
    assert make("io-svd", score="first").needs_loss_gradients
    assert make("io-svd", score="second", remap="loss-aware").needs_loss_gradients
    assert make("zero-sum").needs_loss_gradients


def test_rank_map_skips_the_loss_gradient_and_reproduces_the_run(calib_ids, monkeypatch):
    """With a given rank map io-svd still needs its output metric but not G (score=both)."""
    config = rankcut.make_config("io-svd", ratio=0.4, score="both")
    first = tiny_model()
    ranks = rankcut.compress(first, config, calib_ids).rank_map
    calls = []
    real = engine.BlockRun.store_by_backward

    def spy(run, *args, **kwargs):
        real(run, *args, **kwargs)
        calls.append(run.weight_grads)

    monkeypatch.setattr(engine.BlockRun, "store_by_backward", spy)
    second = tiny_model()
    report = rankcut.compress(second, config, calib_ids, rank_map=ranks)
    assert calls == [False] and report.rank_map == ranks
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("settings", [{}, {"kl_mode": "exact", "top_k": 3},
                                      {"score": "second", "rule": "least-sensitive"}])
def test_io_svd_compresses_to_the_budget_with_two_sided_factors(calib_ids, settings):
    model = tiny_model()
    report = rankcut.compress(model, rankcut.make_config("io-svd", ratio=0.4, **settings),
                              calib_ids)
    assert 0.4 <= report.achieved_ratio < 0.41
    assert len({r.rank for r in report.modules}) > 2
    assert model.config.quantization_config["method"] == "io-svd"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib_ids).logits).all()


def test_top_1_metric_is_zero_and_warned(calib_ids, caplog):
    """Renormalized over one token, p is a point mass: every seed is zero."""
    assert all(torch.count_nonzero(s) == 0 for s in fisher.kl_seeds(_logits(3), 1, "exact"))
    model = tiny_model()
    layers = rankcut.architecture.select_targets(model, include=["*.layers.1.mlp.*"])
    with OutputMetricHooks(layers, 1, "sample") as outputs:
        calibration_gradients(model, layers, calib_ids, output_hooks=outputs)
    assert all(torch.count_nonzero(s.xx) == 0 for s in outputs.stats.values())
    assert "top_k=1" not in caplog.text
    rankcut.compress(model, rankcut.make_config("io-svd", ratio=0.3, top_k=1), calib_ids,
                     include=["*.layers.1.mlp.*"])
    assert "top_k=1" in caplog.text
