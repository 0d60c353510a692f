"""Rank allocation: how many singular components each matrix keeps under one budget.

Pure functions on shapes and per-component scores; no model, no hooks. The budget is in
parameters: the target layers keep at most (1 − ρ)·Σ mn, where a matrix of rank r keeps
r(m + n) parameters when r is below its break-even rank r* and mn (dense) otherwise.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .linalg import break_even_rank, uniform_rank

RULES = ("zero-sum", "least-sensitive")


@dataclass
class Selection:
    """The outcome of a global selection.

    Attributes:
        ranks: {matrix: rank, or None when it stays dense (rank ≥ r*)}.
        dropped: (matrix, component index, ΔL, running sum after it), in drop order.
    """

    ranks: dict[str, int | None]
    dropped: list[tuple[str, int, float, float]] = field(default_factory=list)


def kept_params(m: int, n: int, rank: int) -> int:
    """Parameters a rank-``rank`` factorization keeps, or m·n when it is not below r*."""
    return rank * (m + n) if rank < break_even_rank(m, n) else m * n


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int | None]:
    """Returns r = floor((1 − ρ)·mn/(m + n)) per matrix; None where that is not below r*."""
    ranks = {}
    for name, (m, n) in shapes.items():
        r = uniform_rank(m, n, ratio)
        ranks[name] = r if r < break_even_rank(m, n) else None
    return ranks


def global_select(
    shapes: dict[str, tuple[int, int]],
    scores: dict[str, torch.Tensor],
    ratio: float,
    rule: str = "zero-sum",
    min_rank: int = 1,
    cost: Callable[[int, int, int], float] = kept_params,
) -> Selection:
    """Drops singular components across all matrices until the parameter budget is met.

    Each matrix offers only its smallest remaining component (spectral order is kept).
    ``zero-sum``: two min-heaps keyed by |ΔL|, one for ΔL ≥ 0 and one for ΔL < 0; while the
    running sum s of dropped ΔL is ≤ 0 the next drop comes from the positive heap, else from
    the negative heap (the other heap when one is empty), so s stays near zero.
    ``least-sensitive``: always drop the smallest |ΔL| offered.

    Args:
        shapes: {matrix: (m, n)}.
        scores: {matrix: ΔL_i for its components, in spectral order}.
        ratio: fraction of the total m·n to remove, in (0, 1).
        rule: ``"zero-sum"`` or ``"least-sensitive"``.
        min_rank: no matrix goes below this rank.
        cost: size a rank-r m×n matrix keeps, in the units of m·n, or m·n when it stays
            dense (default ``kept_params``; ``hybrid.classic_cost`` for int8 remaps).

    Returns:
        The ranks (None = dense) and the drop trace. Deterministic: ties break by the
        order of ``shapes``.

    Raises:
        ConfigError: unknown rule, or the budget cannot be met above ``min_rank``.
    """
    if rule not in RULES:
        raise ConfigError(f"unknown allocation rule {rule!r}; choose one of {', '.join(RULES)}")
    order = {name: i for i, name in enumerate(shapes)}
    rank = {name: int(scores[name].numel()) for name in shapes}
    values = {name: scores[name].tolist() for name in shapes}
    kept = sum(cost(m, n, rank[name]) for name, (m, n) in shapes.items())
    budget = (1.0 - ratio) * sum(m * n for m, n in shapes.values())
    heaps: dict[bool, list] = {True: [], False: []}

    def offer(name: str) -> None:
        if rank[name] > min_rank:
            delta = values[name][rank[name] - 1]
            heapq.heappush(heaps[delta >= 0], (abs(delta), order[name], name))

    for name in shapes:
        offer(name)
    running, selection = 0.0, Selection(ranks={})
    while kept > budget:
        name = _next(heaps, running, rule)
        if name is None:
            raise ConfigError(f"cannot remove {ratio:.1%} of the parameters with min_rank="
                              f"{min_rank}; lower min_rank or the ratio")
        m, n = shapes[name]
        delta = values[name][rank[name] - 1]
        running += delta
        selection.dropped.append((name, rank[name] - 1, delta, running))
        kept -= cost(m, n, rank[name]) - cost(m, n, rank[name] - 1)
        rank[name] -= 1
        offer(name)
    selection.ranks = {name: (r if cost(*shapes[name], r) < shapes[name][0] * shapes[name][1]
                              else None) for name, r in rank.items()}
    return selection


def _next(heaps: dict[bool, list], running: float, rule: str) -> str | None:
    positive, negative = heaps[True], heaps[False]
    if rule == "least-sensitive":
        candidates = [h for h in (positive, negative) if h]
        heap = min(candidates, key=lambda h: h[0]) if candidates else None
    elif positive and (running <= 0 or not negative):
        heap = positive
    else:
        heap = negative or None
    return heapq.heappop(heap)[2] if heap else None


def loss_balanced_ranks(
    shapes: dict[str, tuple[int, int]],
    sigmas: dict[str, torch.Tensor],
    ratio: float,
    tokens: int,
) -> dict[str, int | None]:
    """SVD-LLM v2's heterogeneous ranks: per module type, ratios from truncation losses.

    For every matrix, L = √(N·Σ_{i ≥ r} σ_i²) is its theoretical truncation loss
    ‖(W − W_r) X‖_F over the N calibration tokens at the uniform rank r (σ from the
    whitened SVD with R = XXᵀ/N). Within each module type (all q_proj, all down_proj, …)
    the matrices get ratios ρ_i = ρ · w_i / mean(w) with w_i = 1 / log(max(L_i, e)): a
    matrix that loses more is cut less. The ranks are then repaired greedily to the exact
    global budget (``fill_budget``).

    Args:
        shapes: {matrix: (m, n)}.
        sigmas: {matrix: its whitened singular values, descending}.
        ratio: fraction of the total m·n to remove, in (0, 1).
        tokens: N, the number of calibration tokens behind the statistics.

    Returns:
        {matrix: rank, or None when it stays dense}. Pure; deterministic.
    """
    weights = {}
    for name, (m, n) in shapes.items():
        tail = sigmas[name][uniform_rank(m, n, ratio):].square().sum()
        weights[name] = 1.0 / math.log(max(math.sqrt(tokens * float(tail)), math.e))
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(name)  # by module type
    ranks = {}
    for names in groups.values():
        mean = sum(weights[name] for name in names) / len(names)
        for name in names:
            m, n = shapes[name]
            own = min(max(ratio * weights[name] / mean, 0.0), 0.99)
            ranks[name] = min(uniform_rank(m, n, own), sigmas[name].numel())
    ranks = fill_budget(shapes, sigmas, ranks, (1.0 - ratio) * sum(m * n for m, n in
                                                                     shapes.values()))
    return {name: (r if r < break_even_rank(*shapes[name]) else None)
            for name, r in ranks.items()}


def fill_budget(
    shapes: dict[str, tuple[int, int]],
    sigmas: dict[str, torch.Tensor],
    ranks: dict[str, int],
    budget: float,
) -> dict[str, int]:
    """Repairs ranks greedily so the kept parameters meet ``budget`` exactly.

    While over budget, takes the step down with the smallest lost σ² per parameter saved;
    then, while one fits, the step up with the largest regained σ² per parameter added.
    A step is one component, except across the break-even rank r*, where a dense matrix
    steps straight to r* − 1 (and back). Afterwards the kept parameters are ≤ budget and no
    further step fits. Ranks stay in [1, len(σ)].

    Returns:
        The repaired ranks (a new dict; len(σ) for a dense matrix). Pure.
    """
    full = {name: sigmas[name].numel() for name in shapes}
    ranks = {name: (full[name] if r >= break_even_rank(*shapes[name]) else r)
             for name, r in ranks.items()}
    kept = sum(kept_params(*shapes[n], r) for n, r in ranks.items())

    def step(name: str, up: bool) -> tuple[int, float, int]:
        """(new rank, σ² moved, parameters moved) of one step of ``name``."""
        m, n = shapes[name]
        r, star = ranks[name], break_even_rank(m, n)
        new = (r + 1 if r + 1 < star else full[name]) if up else (star - 1 if r >= star else r - 1)
        low, high = sorted((r, new))
        return new, float(sigmas[name][low:high].square().sum()), abs(
            kept_params(m, n, new) - kept_params(m, n, r))

    while kept > budget:
        down = {n: step(n, False) for n in ranks if ranks[n] > 1}
        name = min(down, key=lambda n: down[n][1] / max(1, down[n][2]))
        ranks[name], kept = down[name][0], kept - down[name][2]
    while True:
        up = {n: step(n, True) for n in ranks if ranks[n] < full[n]}
        up = {n: s for n, s in up.items() if kept + s[2] <= budget}
        if not up:
            return ranks
        name = max(up, key=lambda n: up[n][1] / max(1, up[n][2]))
        ranks[name], kept = up[name][0], kept + up[name][2]
