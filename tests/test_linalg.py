"""The pure math on random matrices: whitening, truncation identities, fallbacks."""

import pytest
import torch

from rankcut.core import linalg


def _data(m=24, n=16, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    return w, x


def _moment(x):
    stats = linalg.SecondMoment.zeros(x.shape[1])
    for chunk in x.split(37):
        stats.update(chunk)
    return stats


def test_second_moment_matches_direct_sum_and_merges():
    _, x = _data()
    stats = _moment(x)
    assert stats.count == x.shape[0]
    torch.testing.assert_close(stats.mean(), x.T @ x / x.shape[0])
    a, b = _moment(x[:100]), _moment(x[100:])
    a.merge(b)
    torch.testing.assert_close(a.xx, stats.xx)
    assert a.count == stats.count


def test_second_moment_over_several_panels_matches_direct_sum():
    n = linalg.TILE + 300  # two panels: 1024 × 1024 and 300 × 1324
    x = torch.randn(40, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stats = _moment(x)
    assert [tuple(p.shape) for p in stats.panels] == [(linalg.TILE, linalg.TILE), (300, n)]
    torch.testing.assert_close(stats.xx, x.T @ x, rtol=1e-12, atol=1e-9)
    stats.consumable = True
    torch.testing.assert_close(stats.mean(), x.T @ x / 40, rtol=1e-12, atol=1e-9)
    assert stats.panels is None  # given away
    with pytest.raises(ValueError, match="consumed"):
        stats.mean()


@pytest.mark.parametrize(("n", "tile"), [(16, 5), (33, 8), (40, 64)])
def test_in_place_cholesky_matches_lapack_and_leaves_the_upper_triangle(n, tile):
    _, x = _data(n=n, tokens=3 * n)
    r = _moment(x).mean()
    r = (r + r.T) / 2
    work = r.clone()
    assert linalg._cholesky_lower_in_place(work, tile)
    torch.testing.assert_close(work.tril(), torch.linalg.cholesky(r), rtol=1e-10, atol=1e-12)
    assert torch.equal(work.triu(1), r.triu(1))


def test_failed_in_place_cholesky_is_undone_and_damped_like_the_copying_path(caplog):
    _, x = _data(n=40, tokens=12)  # rank 12 < 40: fails undamped in a later tile
    r = _moment(x).mean()
    r = (r + r.T) / 2
    work = r.clone()
    assert not linalg._cholesky_lower_in_place(work, 8)
    work.diagonal().copy_(r.diagonal())
    linalg._mirror_upper_to_lower(work, 8)
    assert torch.equal(work, r)
    copying = linalg.cholesky_whitening(r.clone())
    in_place = linalg.cholesky_whitening(r.clone(), overwrite=True)
    assert in_place.damping == copying.damping > 0 and in_place.kind == "cholesky"
    torch.testing.assert_close(in_place.root, copying.root, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("n", "tile"), [(37, 8), (9, 64)])
def test_in_place_symmetrizing_equals_the_copying_one(n, tile):
    r = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    expected = linalg._checked_symmetric(r)
    assert torch.equal(linalg._checked_symmetric(r.clone(), overwrite=True, tile=tile), expected)


def test_empty_second_moment_raises():
    with pytest.raises(ValueError, match="no calibration tokens"):
        linalg.SecondMoment.zeros(3).mean()


@pytest.mark.parametrize("rank", [1, 5, 11])
def test_truncation_loss_equals_discarded_whitened_sigma(rank):
    w, x = _data()
    r = _moment(x).mean()
    dec = linalg.decompose(w, input_whitening=linalg.cholesky_whitening(r))
    w_u, w_v = dec.factors(rank)
    measured = linalg.reconstruction_error(w, w_u @ w_v, r)
    predicted = dec.truncation_loss(rank)
    assert abs(measured - predicted) <= 1e-6 * predicted
    # and the same figure as ‖(W − W′)X‖² / N
    direct = float(((w - w_u @ w_v) @ x.T).square().sum()) / x.shape[0]
    assert abs(direct - predicted) <= 1e-6 * predicted


def test_full_rank_reproduces_weight():
    w, x = _data()
    dec = linalg.decompose(w, input_whitening=linalg.cholesky_whitening(_moment(x).mean()))
    w_u, w_v = dec.factors(min(w.shape))
    torch.testing.assert_close(w_u @ w_v, w, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("rank", [2, 6, 10])
def test_whitened_svd_beats_plain_svd_on_activations(rank):
    w, x = _data()
    r = _moment(x).mean()
    plain = linalg.decompose(w).factors(rank)
    whitened = linalg.decompose(w, input_whitening=linalg.cholesky_whitening(r)).factors(rank)
    err_plain = linalg.reconstruction_error(w, plain[0] @ plain[1], r)
    err_white = linalg.reconstruction_error(w, whitened[0] @ whitened[1], r)
    assert err_white < err_plain


def test_rank_deficient_statistics_still_factorize(caplog):
    w, x = _data(tokens=5)  # fewer tokens than inputs: R has rank 5 < 16
    r = _moment(x).mean()
    whitening = linalg.cholesky_whitening(r)
    assert whitening.damping > 0 or whitening.kind == "eigen"
    assert "damped" in caplog.text or "eigen-root" in caplog.text
    w_u, w_v = linalg.decompose(w, input_whitening=whitening).factors(4)
    assert torch.isfinite(w_u).all() and torch.isfinite(w_v).all()
    # on the calibration tokens the whitened cut still beats plain SVD
    plain = linalg.decompose(w).factors(4)
    assert (linalg.reconstruction_error(w, w_u @ w_v, r)
            <= linalg.reconstruction_error(w, plain[0] @ plain[1], r) * (1 + 1e-6))


def test_zero_matrix_is_damped_and_factorizes(caplog):
    whitening = linalg.cholesky_whitening(torch.zeros(6, 6, dtype=torch.float64))
    assert whitening.damping > 0
    assert "damped" in caplog.text
    w = torch.randn(4, 6, dtype=torch.float64)
    w_u, w_v = linalg.decompose(w, input_whitening=whitening).factors(2)
    assert torch.isfinite(w_u @ w_v).all()


def test_indefinite_matrix_falls_back_to_clamped_eigen_root(caplog):
    r = torch.diag(torch.tensor([3.0, 2.0, -4.0], dtype=torch.float64))
    whitening = linalg.cholesky_whitening(r)
    assert whitening.kind == "eigen"
    assert "eigen-root" in caplog.text
    assert torch.isfinite(whitening.right_inverse(torch.eye(3, dtype=torch.float64))).all()


def test_eigen_root_and_cholesky_agree_on_their_own_root():
    w, x = _data()
    r = _moment(x).mean()
    for whitening in (linalg.cholesky_whitening(r), linalg.eigen_whitening(r)):
        s = whitening.root
        torch.testing.assert_close(s @ s.T, r, rtol=1e-6, atol=1e-8)
        a = torch.randn(3, r.shape[0], dtype=torch.float64)
        torch.testing.assert_close(whitening.right_inverse(a) @ s, a, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(s.T @ whitening.left_inverse_transpose(a.T), a.T,
                                   rtol=1e-6, atol=1e-8)


def test_nan_statistics_raise_a_clear_error():
    r = torch.eye(4, dtype=torch.float64)
    r[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        linalg.cholesky_whitening(r)


def test_break_even_and_uniform_rank():
    m, n = 576, 1536
    star = linalg.break_even_rank(m, n)
    assert star * (m + n) < m * n <= (star + 1) * (m + n)
    r = linalg.uniform_rank(m, n, 0.2)
    assert r * (m + n) <= 0.8 * m * n < (r + 1) * (m + n)
    assert linalg.factored_params(m, n, None) == m * n


def test_column_and_row_scaling_are_undone_by_factors():
    w, _ = _data()
    col = torch.rand(w.shape[1], dtype=torch.float64) + 0.5
    row = torch.rand(w.shape[0], dtype=torch.float64) + 0.5
    for dec in (linalg.decompose(w, column_scale=col), linalg.decompose(w, row_scale=row)):
        w_u, w_v = dec.factors(min(w.shape))
        torch.testing.assert_close(w_u @ w_v, w, atol=1e-9, rtol=1e-9)


def _anchored_pair(seed=4):
    """W, the original inputs X and the compressed model's inputs X′ (X plus a
    correlated error, as an upstream truncation leaves)."""
    w, x = _data(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_prime = x + 0.3 * x @ torch.randn(16, 16, generator=g, dtype=torch.float64) / 4
    return w, x, x_prime


def _anchored(w, x, x_prime):
    whitening = linalg.cholesky_whitening(_moment(x_prime).mean())
    return linalg.decompose(w, input_whitening=whitening, cross=x.T @ x_prime / x.shape[0])


@pytest.mark.parametrize("rank", [1, 6, 12])
def test_anchored_truncation_loss_is_the_dropped_sigma_above_the_optimum(rank):
    w, x, x_prime = _anchored_pair()
    tokens = x.shape[0]
    decomposition = _anchored(w, x, x_prime)
    target = x @ w.T  # the original layer on the original inputs
    optimum = torch.linalg.lstsq(x_prime, target).solution.T  # unconstrained best W′
    floor = (target - x_prime @ optimum.T).square().sum() / tokens
    w_u, w_v = decomposition.factors(rank)
    error = (target - x_prime @ (w_u @ w_v).T).square().sum() / tokens
    assert float(error - floor) == pytest.approx(decomposition.truncation_loss(rank), rel=1e-8)
    # the anchored cut beats SVD-LLM's on the anchored error, which SVD-LLM does not see
    plain = linalg.decompose(w, input_whitening=linalg.cholesky_whitening(_moment(x).mean()))
    p_u, p_v = plain.factors(rank)
    assert error < (target - x_prime @ (p_u @ p_v).T).square().sum() / tokens


def test_anchored_objective_reduces_to_svd_llm_when_the_inputs_agree():
    w, x = _data(seed=5)
    anchored = _anchored(w, x, x)
    plain = linalg.decompose(w, input_whitening=linalg.cholesky_whitening(_moment(x).mean()))
    torch.testing.assert_close(anchored.sigma, plain.sigma, rtol=1e-9, atol=1e-12)
    a_u, a_v = anchored.factors(7)
    p_u, p_v = plain.factors(7)
    torch.testing.assert_close(a_u @ a_v, p_u @ p_v, rtol=1e-8, atol=1e-10)


def _output_metric(m=24, seed=6):
    """T with T Tᵀ = C, a random positive definite output metric (as io-svd's KL metric)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(m, m, generator=g, dtype=torch.float64)
    return linalg.cholesky_whitening(mix @ mix.T / m + 0.1 * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("rank", [1, 6, 12])
def test_anchored_cut_in_an_output_metric_drops_sigma_in_that_metric(rank):
    """With io-svd's output whitening T, the anchored cut solves min ‖Tᵀ(W X − W′ X′)‖:
    its error in that metric is the dropped σ² above the unconstrained optimum (which T
    does not move), and it beats the input-only anchored cut there."""
    w, x, x_prime = _anchored_pair()
    tokens, metric = x.shape[0], _output_metric()
    whitening = linalg.cholesky_whitening(_moment(x_prime).mean())
    decomposition = linalg.decompose(w, input_whitening=whitening, output_whitening=metric,
                                     cross=x.T @ x_prime / tokens)
    target = x @ w.T
    optimum = torch.linalg.lstsq(x_prime, target).solution.T

    def error(approx):
        return ((target - x_prime @ approx.T) @ metric.root).square().sum() / tokens

    w_u, w_v = decomposition.factors(rank)
    assert float(error(w_u @ w_v) - error(optimum)) == pytest.approx(
        decomposition.truncation_loss(rank), rel=1e-8)
    i_u, i_v = _anchored(w, x, x_prime).factors(rank)
    assert error(w_u @ w_v) < error(i_u @ i_v)


def test_anchored_cut_in_an_output_metric_reduces_to_io_svd_when_the_inputs_agree():
    w, x = _data(seed=5)
    metric, whitening = _output_metric(), linalg.cholesky_whitening(_moment(x).mean())
    anchored = linalg.decompose(w, input_whitening=whitening, output_whitening=metric,
                                cross=x.T @ x / x.shape[0])
    two_sided = linalg.decompose(w, input_whitening=whitening, output_whitening=metric)
    torch.testing.assert_close(anchored.sigma, two_sided.sigma, rtol=1e-9, atol=1e-12)
    a_u, a_v = anchored.factors(7)
    p_u, p_v = two_sided.factors(7)
    torch.testing.assert_close(a_u @ a_v, p_u @ p_v, rtol=1e-8, atol=1e-10)


def test_anchored_objective_needs_a_whitening():
    w, x = _data()
    with pytest.raises(ValueError, match="whitening"):
        linalg.decompose(w, cross=x.T @ x)
