"""Hybrid low-rank + int8 storage: which factor rows to store in int8 (pure math).

A rank-r factorization W ≈ W_u W_v has 2r factor rows: for each singular component i its
output vector u_i (column i of W_u, m values) and its input vector v_i (row i of W_v,
n values). Each row is stored either in 16-bit or in int8 with one 16-bit absmax scale.
Budgets are in bytes, relative to the dense layer stored in 16-bit (2·m·n bytes).

- ``classic`` remap: a fixed set of rows — all rows of the smaller side, then as many rows
  of the larger side as make the module cost about r·max(m, n) 16-bit values.
- ``loss-aware`` remap: every row gets a predicted loss change of quantizing it (first
  order ⟨∂L/∂F_j, Q(F_j) − F_j⟩ plus the second-order term in the two-sided metric), and
  the rows with the smallest change per byte saved are quantized, across all modules,
  until the byte budget is met.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linalg import Decomposition

REMAPS = ("classic", "loss-aware")
SCALE_BYTES = 2  # one 16-bit scale per int8 row
INT8_MAX = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 quantization of each row of ``x`` [k, d].

    Returns:
        (int8 values [k, d], float32 scales [k]) with x ≈ values · scale[:, None].
    """
    scale = x.detach().abs().amax(dim=1).float().clamp_min(1e-12) / INT8_MAX
    values = torch.round(x.detach().float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return values.to(torch.int8), scale


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns values · scale[:, None] in ``dtype``."""
    return (values.to(dtype) * scale.to(dtype)[:, None])


def fake_quantized(x: torch.Tensor) -> torch.Tensor:
    """Returns Q(x): the rows of ``x`` after an int8 round trip (same dtype as x)."""
    return dequantize_rows(*quantize_rows(x), dtype=x.dtype)


@dataclass(frozen=True)
class RowPlan:
    """Which factor rows of one rank-r module are int8.

    Attributes:
        u_int8: [r] bool, component i's output vector u_i is int8.
        v_int8: [r] bool, component i's input vector v_i is int8.
    """

    u_int8: torch.Tensor
    v_int8: torch.Tensor


def factor_bytes(m: int, n: int, rank: int, u_int8: int = 0, v_int8: int = 0) -> int:
    """Bytes of a rank-``rank`` module with ``u_int8`` / ``v_int8`` int8 rows (16-bit
    elsewhere, one 16-bit scale per int8 row)."""
    fp = 2 * rank * (m + n) - 2 * (u_int8 * m + v_int8 * n)
    return fp + u_int8 * (m + SCALE_BYTES) + v_int8 * (n + SCALE_BYTES)


def classic_counts(m: int, n: int, rank: int) -> tuple[int, int]:
    """Returns (u rows, v rows) in int8 under the classic remap: every row of the smaller
    side, then ⌊r·min/max⌋ rows of the larger side (cost ≈ r·max(m, n) 16-bit values)."""
    if m >= n:
        return math.floor(rank * n / m), rank
    return rank, math.floor(rank * m / n)


def classic_cost(m: int, n: int, rank: int) -> float:
    """Kept size in 16-bit values (bytes / 2) of a classic-remapped rank-r module, or m·n
    when that does not save anything (the module stays dense)."""
    size = factor_bytes(m, n, rank, *classic_counts(m, n, rank)) / 2
    return size if size < m * n else m * n


def classic_plan(m: int, n: int, rank: int) -> RowPlan:
    """The classic rows: the leading components' rows are the int8 ones."""
    u_count, v_count = classic_counts(m, n, rank)
    index = torch.arange(rank)
    return RowPlan(u_int8=index < u_count, v_int8=index < v_count)


def row_loss_changes(decomposition: Decomposition, rank: int,
                     grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted loss change of quantizing each factor row of the rank-r cut, alone.

    For v_i: ΔW = u_i δv_iᵀ, change ≈ u_iᵀ G δv_i + ½‖Tᵀu_i‖²‖Sᵀδv_i‖²; for u_i:
    ΔW = δu_i v_iᵀ, change ≈ δu_iᵀ G v_i + ½‖Tᵀδu_i‖²‖Sᵀv_i‖², with δ the int8 round-trip
    error, G = ∂L/∂W, and S, T the decomposition's input and output whitenings (identity
    when absent).

    Returns:
        (changes of the u rows [r], changes of the v rows [r]), float64. No side effects.
    """
    w_u, w_v = decomposition.factors(rank)
    g = grad.detach().to(w_u.device, torch.float64)
    du = fake_quantized(w_u.T).T - w_u  # column i of W_u is u_i
    dv = fake_quantized(w_v) - w_v
    first_u = (du * (g @ w_v.T)).sum(0)
    first_v = ((g.T @ w_u).T * dv).sum(1)
    out_u, out_du = _out_norms(decomposition, w_u), _out_norms(decomposition, du)
    in_v, in_dv = _in_norms(decomposition, w_v), _in_norms(decomposition, dv)
    return first_u + 0.5 * out_du * in_v, first_v + 0.5 * out_u * in_dv


def _out_norms(decomposition: Decomposition, columns: torch.Tensor) -> torch.Tensor:
    """‖Tᵀ c‖² for every column c."""
    if decomposition.output_whitening is not None:
        columns = decomposition.output_whitening.root.T @ columns
    return columns.square().sum(0)


def _in_norms(decomposition: Decomposition, rows: torch.Tensor) -> torch.Tensor:
    """‖Sᵀ r‖² for every row r."""
    if decomposition.input_whitening is not None:
        rows = rows @ decomposition.input_whitening.root
    return rows.square().sum(1)


def loss_aware_plans(
    shapes: dict[str, tuple[int, int]],
    ranks: dict[str, int | None],
    changes: dict[str, tuple[torch.Tensor, torch.Tensor]],
    byte_budget: float,
) -> dict[str, RowPlan]:
    """Quantizes the rows with the smallest predicted change per byte saved, across all
    factorized modules, until the total size is within ``byte_budget``.

    Args:
        shapes: {module: (m, n)} of every target module (dense ones count 2·m·n bytes).
        ranks: {module: rank or None for dense}.
        changes: {module: (u row changes, v row changes)} for every factorized module.
        byte_budget: the most bytes the target modules may take.

    Returns:
        {factorized module: RowPlan}. Deterministic: ties break by module order, then row.
    """
    total = sum(2 * m * n if ranks[name] is None else factor_bytes(m, n, ranks[name])
                for name, (m, n) in shapes.items())
    candidates = []
    for order, (name, (du, dv)) in enumerate(changes.items()):
        m, n = shapes[name]
        for side, values, saved in (("u", du, m - SCALE_BYTES), ("v", dv, n - SCALE_BYTES)):
            candidates += [(float(c) / saved, order, side, i, saved)
                           for i, c in enumerate(values.tolist())]
    candidates.sort()
    plans = {name: RowPlan(torch.zeros(ranks[name], dtype=torch.bool),
                           torch.zeros(ranks[name], dtype=torch.bool)) for name in changes}
    names = list(changes)
    for _, order, side, i, saved in candidates:
        if total <= byte_budget:
            break
        plan = plans[names[order]]
        (plan.u_int8 if side == "u" else plan.v_int8)[i] = True
        total -= saved
    return plans


def component_order(plan: RowPlan) -> tuple[torch.Tensor, int, int, int]:
    """Orders components so both int8 sets are contiguous ranges.

    Components go in four groups: (u int8, v 16-bit), (u int8, v int8), (u 16-bit, v int8),
    (u 16-bit, v 16-bit). The int8 u rows are then the first ``u_count`` components and the
    int8 v rows the ``v_count`` components from ``v_start``.

    Returns:
        (permutation of the components, u_count, v_start, v_count).
    """
    u, v = plan.u_int8, plan.v_int8
    groups = [u & ~v, u & v, ~u & v, ~u & ~v]
    perm = torch.cat([torch.nonzero(g).flatten() for g in groups])
    u_count, v_count = int(u.sum()), int(v.sum())
    return perm, u_count, int(groups[0].sum()), v_count
