"""Hybrid low-rank + int8 storage: quantization, row plans, byte budgets, real int8 tensors."""

import json

import pytest
import torch
from safetensors import safe_open

import rankcut
from rankcut.core import hybrid, linalg
from rankcut.core.allocation import global_select
from rankcut.nn.modules import LowRankLinear

from .conftest import tiny_model


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_int8_rows_round_trip_within_half_a_step():
    x = torch.randn(7, 33, generator=_gen(), dtype=torch.float64) * torch.rand(7, 1) * 10
    values, scale = hybrid.quantize_rows(x)
    assert values.dtype == torch.int8 and scale.shape == (7,)
    assert values.abs().max() == 127
    error = (hybrid.dequantize_rows(values, scale, torch.float64) - x).abs()
    assert (error <= scale.double()[:, None] / 2 + 1e-12).all()


def test_component_order_makes_both_int8_sets_contiguous():
    u = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    v = torch.tensor([0, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    perm, u_count, v_start, v_count = hybrid.component_order(hybrid.RowPlan(u, v))
    assert sorted(perm.tolist()) == list(range(8))
    assert u[perm][:u_count].all() and not u[perm][u_count:].any()
    in_range = torch.zeros(8, dtype=torch.bool)
    in_range[v_start:v_start + v_count] = True
    assert torch.equal(v[perm], in_range)


def _random_plan(rank, seed):
    g = _gen(seed)
    return hybrid.RowPlan(torch.rand(rank, generator=g) < 0.5, torch.rand(rank, generator=g) < 0.5)


def test_hybrid_layer_stores_int8_and_computes_the_product():
    g = _gen(1)
    w_u, w_v = torch.randn(12, 6, generator=g), torch.randn(6, 10, generator=g)
    bias = torch.randn(12, generator=g)
    plan = _random_plan(6, 2)
    layer = LowRankLinear.from_factors(w_u, w_v, bias, plan=plan)
    state = layer.state_dict()
    assert state["weight_u_int8"].dtype == torch.int8
    assert state["weight_u_int8"].shape == (int(plan.u_int8.sum()), 12)
    assert state["weight_v_int8"].shape == (int(plan.v_int8.sum()), 10)
    assert state["weight_u"].shape == (12, 6 - int(plan.u_int8.sum()))
    assert state["weight_v"].shape == (6 - int(plan.v_int8.sum()), 10)
    # the product equals the product of the round-tripped factors (order does not matter)
    expected = (torch.where(plan.u_int8[:, None], hybrid.fake_quantized(w_u.T), w_u.T).T
                @ torch.where(plan.v_int8[:, None], hybrid.fake_quantized(w_v), w_v))
    torch.testing.assert_close(layer.dense_weight(), expected, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 10, generator=g)
    torch.testing.assert_close(layer(x), x @ expected.T + bias, atol=1e-5, rtol=1e-5)
    for tokens in (4, 40):  # decode-sized (no factor assembled) and prefill-sized calls
        batched = torch.randn(2, tokens, 10, generator=g)  # [batch, tokens, in]
        torch.testing.assert_close(layer(batched), batched @ expected.T + bias, atol=1e-5,
                                   rtol=1e-5)
    # a layer rebuilt from the layout loads the state dict and gives the same output
    layout = {k: v for k, v in layer.layout.items() if k != "rank"}
    again = LowRankLinear(10, 12, 6, bias=True, **layout)
    again.load_state_dict(state)
    torch.testing.assert_close(again(x), layer(x))


def test_classic_cost_is_rank_times_max_side():
    for m, n in ((576, 576), (1536, 576), (576, 1536), (192, 576)):
        for r in (1, 40, min(m, n) // 2):
            size = hybrid.classic_cost(m, n, r)
            assert r * max(m, n) <= size <= r * max(m, n) + r * 2 + max(m, n), (m, n, r)
        assert hybrid.classic_cost(m, n, min(m, n)) == m * n  # no saving at full rank


def test_row_changes_are_exact_on_a_quadratic_loss():
    """On L(W) = ⟨G0, W⟩ + ½ tr((W − W0)ᵀ C (W − W0) R) the first + second-order row
    changes of the predicted int8 rounding are exact when G is the gradient at W_u W_v."""
    g = _gen(3)
    m, n, rank = 9, 7, 4
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    g0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    a, b = (torch.randn(k, 2 * k, generator=g, dtype=torch.float64) for k in (n, m))
    r, c = a @ a.T / n, b @ b.T / m
    dec = linalg.decompose(w0, linalg.cholesky_whitening(r), linalg.cholesky_whitening(c))
    w_u, w_v = dec.factors(rank)

    def loss(w):
        d = w - w0
        return float((g0 * w).sum() + 0.5 * torch.trace(d.T @ c @ d @ r))

    grad = g0 + c @ (w_u @ w_v - w0) @ r
    du, dv = hybrid.row_loss_changes(dec, rank, grad)
    base = loss(w_u @ w_v)
    for i in range(rank):
        u_q = w_u.clone()
        u_q[:, i] = hybrid.fake_quantized(w_u[:, i:i + 1].T).T[:, 0]
        assert loss(u_q @ w_v) - base == pytest.approx(float(du[i]), rel=1e-6, abs=1e-12)
        v_q = w_v.clone()
        v_q[i] = hybrid.fake_quantized(w_v[i:i + 1])[0]
        assert loss(w_u @ v_q) - base == pytest.approx(float(dv[i]), rel=1e-6, abs=1e-12)


def test_loss_aware_plans_meet_the_byte_budget_with_the_cheapest_rows():
    g = _gen(4)
    shapes = {"a": (64, 32), "b": (32, 48), "c": (40, 40)}
    ranks = {"a": 12, "b": 10, "c": None}
    changes = {k: (torch.randn(ranks[k], generator=g, dtype=torch.float64),
                   torch.randn(ranks[k], generator=g, dtype=torch.float64))
               for k in ("a", "b")}
    full = sum(hybrid.factor_bytes(*shapes[k], ranks[k]) for k in ("a", "b")) + 2 * 40 * 40
    budget = full - 1500
    plans = hybrid.loss_aware_plans(shapes, ranks, changes, budget)
    size = 2 * 40 * 40 + sum(hybrid.factor_bytes(*shapes[k], ranks[k], int(p.u_int8.sum()),
                                                 int(p.v_int8.sum())) for k, p in plans.items())
    assert size <= budget
    per_byte = []
    for k, plan in plans.items():
        m, n = shapes[k]
        for side, size, mask in ((0, m, plan.u_int8), (1, n, plan.v_int8)):
            per_byte += [(float(changes[k][side][i]) / (size - 2), bool(mask[i]))
                         for i in range(ranks[k])]
    chosen = [v for v, q in per_byte if q]
    assert chosen and max(chosen) <= min(v for v, q in per_byte if not q)


def test_classic_remap_selection_allows_ranks_up_to_the_smaller_side():
    shapes = {"gate": (1536, 576), "q": (576, 576)}
    scores = {k: -torch.linspace(1, 0.01, min(s), dtype=torch.float64) for k, s in shapes.items()}
    plain = global_select(shapes, scores, 0.2)
    remapped = global_select(shapes, scores, 0.2, cost=hybrid.classic_cost)
    assert all(r is None for r in plain.ranks.values()) or plain.ranks != remapped.ranks
    assert all(r is not None and r < min(shapes[k]) for k, r in remapped.ranks.items())


@pytest.mark.parametrize("remap", ["classic", "loss-aware"])
def test_io_svd_remap_meets_the_byte_budget_and_round_trips(calib_ids, tmp_path, remap, capsys):
    model = tiny_model()
    config = rankcut.make_config("io-svd", ratio=0.3, remap=remap)
    report = rankcut.compress(model, config, calib_ids)
    assert 0.3 <= report.achieved_byte_ratio < 0.31
    assert report.int8_layout
    int8 = [b for b in model.buffers() if b.dtype == torch.int8]
    assert int8  # real int8 storage in memory
    with torch.no_grad():
        expected = model(input_ids=calib_ids).logits
    out = rankcut.save_pretrained(model, tmp_path / "ckpt")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert any(f.get_slice(k).get_dtype() == "I8" and k.endswith("_int8") for k in f.keys())
    entry = json.loads((out / "config.json").read_text())["quantization_config"]
    assert entry["int8_layout"] == report.int8_layout
    loaded = rankcut.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=calib_ids).logits, expected)
    from rankcut.cli import main

    assert main(["info", str(out)]) in (0, None)
    printed = capsys.readouterr().out
    assert "stored bytes by dtype" in printed and "I8" in printed and "int8 rows" in printed
