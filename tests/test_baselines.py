"""ASVD, FWSVD and SVD-LLM v2: each method's defining property."""

from __future__ import annotations

import pytest
import torch

import rankcut
from rankcut.architecture import select_targets
from rankcut.core import linalg
from rankcut.core.allocation import fill_budget, kept_params, loss_balanced_ranks
from rankcut.errors import ConfigError
from rankcut.methods import make_config, method_spec

from .conftest import tiny_model
from .whole_model import calibration_gradients


def _moments(x: torch.Tensor) -> linalg.SecondMoment:
    stats = linalg.SecondMoment.zeros(x.shape[-1])
    stats.update(x)
    return stats


def test_asvd_with_alpha_zero_is_plain_svd():
    torch.manual_seed(0)
    w, x = torch.randn(12, 20), torch.randn(200, 20) * torch.linspace(0.1, 5, 20)
    spec = method_spec("asvd")
    asvd = spec.decompose(make_config("asvd", alpha=0.0), w, _moments(x), None)
    plain = linalg.decompose(w)
    for rank in (3, 7):
        assert torch.allclose(asvd.factors(rank)[0] @ asvd.factors(rank)[1],
                              plain.factors(rank)[0] @ plain.factors(rank)[1], atol=1e-10)


def test_asvd_scales_columns_by_mean_absolute_activation():
    torch.manual_seed(1)
    w = torch.randn(10, 16)
    x = torch.randn(300, 16) * torch.linspace(0.1, 8, 16)
    stats = _moments(x)
    d = method_spec("asvd").decompose(make_config("asvd", alpha=0.5), w, stats, None)
    expected = torch.linalg.svdvals(w.double() * x.double().abs().mean(0).sqrt())
    assert torch.allclose(d.sigma, expected, rtol=1e-6)
    # the scaling helps where it should: the activation-weighted error is lower than SVD's
    r = stats.mean()
    cuts = {"asvd": d.factors(4), "svd": linalg.decompose(w).factors(4)}
    err = {name: linalg.reconstruction_error(w, a @ b, r) for name, (a, b) in cuts.items()}
    assert err["asvd"] < err["svd"]


def test_fwsvd_weights_rows_by_square_root_fisher():
    torch.manual_seed(2)
    w = torch.randn(14, 9)
    fisher = torch.linspace(0.01, 10, 14).double()
    d = method_spec("fwsvd").decompose(make_config("fwsvd"), w, None, fisher)
    expected = torch.linalg.svdvals(fisher.sqrt()[:, None] * w.double())
    assert torch.allclose(d.sigma, expected, rtol=1e-6)
    # the Fisher-weighted error of FWSVD's cut is the smallest possible at that rank
    a, b = d.factors(3)
    weighted = (fisher.sqrt()[:, None] * (w.double() - a @ b)).square().sum()
    assert torch.isclose(weighted, expected[3:].square().sum(), rtol=1e-6)


def test_row_fisher_sums_squared_batch_gradients(calib_ids):
    model = tiny_model("llama")
    layers = select_targets(model, include=["*.0.mlp.down_proj"])
    name = next(iter(layers))
    fisher = {name: torch.zeros(layers[name].out_features, dtype=torch.float64)}
    calibration_gradients(model, layers, calib_ids, batch_size=1, fisher_rows=fisher)
    expected = torch.zeros_like(fisher[name])
    for sample in calib_ids.split(1):
        model.zero_grad()
        logits = model(input_ids=sample).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), sample[:, 1:].flatten(),
                                          reduction="sum").backward()
        expected += layers[name].weight.grad.double().square().sum(1)
    assert torch.allclose(fisher[name], expected, rtol=1e-4)


def test_svd_llm_v2_uses_the_symmetric_eigen_root():
    torch.manual_seed(3)
    w, x = torch.randn(8, 12), torch.randn(100, 12)
    d = method_spec("svd-llm-v2").decompose(make_config("svd-llm-v2"), w, _moments(x), None)
    root = d.input_whitening.root
    assert d.input_whitening.kind == "eigen"
    assert torch.allclose(root, root.T)
    assert torch.allclose(root @ root.T, _moments(x).mean(), atol=1e-10)


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_eigen_root_and_cholesky_whitening_truncate_alike(rank):
    """Any square root of R gives the same optimal rank-r approximation in the R metric, so
    v2's whitening alone cannot change SVD-LLM's result (only its ranks can)."""
    torch.manual_seed(rank)
    w, x = torch.randn(8, 12), torch.randn(100, 12) @ torch.randn(12, 12)
    stats = _moments(x)
    products = []
    for method in ("svd-llm", "svd-llm-v2"):
        d = method_spec(method).decompose(make_config(method), w, stats, None)
        w_u, w_v = d.factors(rank)
        products.append(w_u @ w_v)
    assert torch.allclose(products[0], products[1], atol=1e-8)


def _random_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes, sigmas = {}, {}
    for layer in range(4):
        for kind, (m, n) in {"q_proj": (32, 32), "k_proj": (16, 32), "gate_proj": (64, 32),
                             "down_proj": (32, 64)}.items():
            name = f"model.layers.{layer}.{kind}"
            shapes[name] = (m, n)
            decay = torch.rand(1, generator=g).item() * 0.3 + 0.02
            sigmas[name] = torch.exp(-decay * torch.arange(min(m, n)).double()) * (1 + layer)
    return shapes, sigmas


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_v2_ranks_meet_the_budget_exactly(ratio):
    shapes, sigmas = _random_problem(int(ratio * 10))
    ranks = loss_balanced_ranks(shapes, sigmas, ratio, tokens=4096)
    budget = (1 - ratio) * sum(m * n for m, n in shapes.values())
    kept = sum(kept_params(*shapes[n], r if r is not None else min(shapes[n]))
               for n, r in ranks.items())
    assert kept <= budget
    # exact: no single component more fits (smallest step is the thinnest matrix's m + n)
    assert budget - kept < max(m + n for m, n in shapes.values())
    assert len({r for r in ranks.values()}) > 2  # heterogeneous


def test_v2_cuts_the_matrix_that_loses_less_more():
    shapes = {"model.layers.0.q_proj": (32, 32), "model.layers.1.q_proj": (32, 32)}
    steep = torch.exp(-0.5 * torch.arange(32).double())  # loses little when cut
    flat = torch.ones(32, dtype=torch.float64)  # loses a lot
    ranks = loss_balanced_ranks(shapes, {"model.layers.0.q_proj": steep,
                                         "model.layers.1.q_proj": flat}, 0.5, tokens=10_000)
    assert ranks["model.layers.0.q_proj"] < ranks["model.layers.1.q_proj"]


def test_fill_budget_adds_back_when_under_and_removes_when_over():
    shapes, sigmas = _random_problem(7)
    budget = 0.5 * sum(m * n for m, n in shapes.values())
    for start in (1, 10):
        ranks = fill_budget(shapes, sigmas, {n: start for n in shapes}, budget)
        kept = sum(kept_params(*shapes[n], r) for n, r in ranks.items())
        assert budget - max(m + n for m, n in shapes.values()) < kept <= budget


@pytest.mark.parametrize("method", ["asvd", "fwsvd", "svd-llm-v2"])
def test_baselines_compress_a_tiny_model(method, calib_ids):
    model = tiny_model("llama")
    ids = calib_ids[:, :16]
    before = model(input_ids=ids).logits
    report = rankcut.compress(model, make_config(method, ratio=0.3), calib_ids)
    assert report.achieved_ratio == pytest.approx(0.3, abs=0.06)
    after = model(input_ids=ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)
    if method == "svd-llm-v2":
        assert report.achieved_ratio >= 0.3 - 1e-9
        assert len({m.rank for m in report.modules if m.name.endswith("q_proj")}) >= 1


def test_baseline_settings_are_validated():
    with pytest.raises(ConfigError, match="alpha"):
        make_config("asvd", alpha=-1.0)
    with pytest.raises(ConfigError, match="sequentially"):
        make_config("svd-llm-v2", sequential=True)
    with pytest.raises(ConfigError, match="at least 1"):
        make_config("fwsvd", grad_batch_size=0)


def test_fwsvd_without_calibration_is_a_clear_error():
    from rankcut.errors import CalibrationError

    with pytest.raises(CalibrationError, match="needs calibration"):
        rankcut.compress(tiny_model("llama"), make_config("fwsvd"), None)
