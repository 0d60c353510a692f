"""Pure math: statistics, whitening and truncated factorizations.

Every function here takes tensors and returns tensors; none touches a model, a hook or a
file. The pipeline (``rankcut.compression.pipeline``) feeds them the statistics it gathered.

Notation follows DESIGN.md: a linear layer computes ``y = W x`` with ``W`` of shape m×n
(out×in); ``R = (1/N) Σ x xᵀ`` is the n×n input second moment; ``S Sᵀ = R``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: Relative damping factors tried, in order, before the eigen-root fallback.
DAMPING_SCHEDULE: tuple[float, ...] = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: A Cholesky factor whose smallest squared pivot is below this fraction of mean(diag R)
#: is treated as numerically singular (condition number above ~1e10).
MIN_PIVOT = 1e-10


#: Rows per panel of a stored second moment, and per tile of the in-place Cholesky.
TILE = 1024


@dataclass
class SecondMoment:
    """Running input statistics of one layer, kept as (sum, count) in float64.

    Σ x xᵀ is symmetric, so only its lower block triangle is kept: panel i holds rows
    [i·TILE, (i+1)·TILE) and columns [0, (i+1)·TILE). For n = 5632 that is 59% of the
    matrix, and each update computes only those products.

    Attributes:
        panels: the lower block triangle of Σ x xᵀ over all tokens seen (float64); None
            once a ``consumable`` accumulator's mean was taken.
        abs_sum: Σ |x| over all tokens seen, n float64 (ASVD's channel scales).
        count: number of tokens seen.
        consumable: ``mean()`` may free the panels while it builds the mean (set by a
            caller that will not read these statistics again).
    """

    panels: list[torch.Tensor] | None
    abs_sum: torch.Tensor
    count: int = 0
    consumable: bool = False

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu") -> SecondMoment:
        """Returns empty statistics for inputs of dimension ``n``."""
        panels = [torch.zeros(min(start + TILE, n) - start, min(start + TILE, n),
                              dtype=torch.float64, device=device) for start in range(0, n, TILE)]
        return cls(panels=panels, abs_sum=torch.zeros(n, dtype=torch.float64, device=device))

    @property
    def xx(self) -> torch.Tensor:
        """Σ x xᵀ as a full n×n matrix (a new tensor; upper triangle mirrored)."""
        return self._assemble(free=False)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the sums (summed in place across processes)."""
        return [*self._live_panels(), self.abs_sum]

    def update(self, x: torch.Tensor, new_tokens: bool = True) -> None:
        """Adds a batch of vectors ``x`` (any leading shape, last dim n). Mutates self.

        ``new_tokens=False`` adds the outer products without counting the tokens again
        (the 2nd…K-th term of a per-token sum such as IO-SVD's Σ_k b_k b_kᵀ).

        Float64 input is multiplied in float64; lower precisions are multiplied in float32
        (the activations carry no more than that) and each panel's product is added to
        the float64 sum: the long accumulation keeps float64 accuracy at half the cost.
        """
        flat = x.reshape(-1, x.shape[-1]).to(self.abs_sum.device)
        if flat.dtype != torch.float64:
            flat = flat.float()
        for i, panel in enumerate(self._live_panels()):
            rows, stop = i * TILE, i * TILE + panel.shape[0]
            if flat.dtype == torch.float64:
                panel.addmm_(flat[:, rows:stop].T, flat[:, :stop])
            else:
                panel.add_(flat[:, rows:stop].T @ flat[:, :stop])
        if new_tokens:
            self.abs_sum.add_(flat.abs().sum(0, dtype=torch.float64))
            self.count += flat.shape[0]

    def merge(self, other: SecondMoment) -> None:
        """Adds another accumulator's sums and counts into this one. Mutates self."""
        for mine, theirs in zip(self._live_panels(), other._live_panels(), strict=True):
            mine.add_(theirs.to(mine.device))
        self.abs_sum.add_(other.abs_sum.to(self.abs_sum.device))
        self.count += other.count

    def mean(self) -> torch.Tensor:
        """Returns R = Σ x xᵀ / N as a new n×n float64 matrix; a ``consumable``
        accumulator frees each panel once it is copied (``panels`` becomes None).

        Raises:
            ValueError: no token was seen, or the matrix was already given away.
        """
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer")
        return self._assemble(free=self.consumable).div_(self.count)

    def _live_panels(self) -> list[torch.Tensor]:
        if self.panels is None:
            raise ValueError("these statistics were consumed by an earlier mean()")
        return self.panels

    def _assemble(self, free: bool) -> torch.Tensor:
        """The full symmetric sum from the panels; with ``free``, each panel is let go
        as soon as it is copied (the peak is one n×n matrix plus one panel)."""
        panels, n = self._live_panels(), self.abs_sum.numel()
        if free:
            self.panels = None
        full = torch.empty(n, n, dtype=torch.float64, device=self.abs_sum.device)
        for i, panel in enumerate(panels):
            rows, stop = i * TILE, i * TILE + panel.shape[0]
            full[rows:stop, :stop] = panel
            full[:rows, rows:stop] = panel[:, :rows].T
            if free:
                panels[i] = None  # the loop variable is the last reference left
        return full

    def mean_abs(self) -> torch.Tensor:
        """Returns mean |x| per input channel (float64). Raises ValueError when empty."""
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer")
        return self.abs_sum / self.count


@dataclass
class Whitening:
    """A square root ``S`` of a second-moment matrix R (S Sᵀ ≈ R), with its inverse action.

    Attributes:
        root: S, n×n float64. Lower-triangular for ``kind == "cholesky"``, symmetric for
            ``kind == "eigen"``.
        kind: ``"cholesky"`` or ``"eigen"``.
        damping: the relative damping λ added as λ·mean(diag R)·I (0 when none was needed).
        inverse: S⁻¹, kept for ``kind == "eigen"`` (computed once from the eigenvalues);
            None for Cholesky, whose inverse is applied by triangular solves.
    """

    root: torch.Tensor
    kind: str
    damping: float
    inverse: torch.Tensor | None = None

    def right_inverse(self, a: torch.Tensor) -> torch.Tensor:
        """Returns ``a S⁻¹`` (a has n columns), by a triangular solve or the eigen-root."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.root, a, upper=False, left=False)
        return a @ self.inverse

    def left_inverse(self, a: torch.Tensor) -> torch.Tensor:
        """Returns ``S⁻¹ a`` (a has n rows)."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.root, a, upper=False, left=True)
        return self.inverse @ a

    def left_inverse_transpose(self, a: torch.Tensor) -> torch.Tensor:
        """Returns ``S⁻ᵀ a`` (a has n rows)."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.root.T, a, upper=True, left=True)
        return self.inverse @ a  # the eigen-root is symmetric: S⁻ᵀ = S⁻¹


def cholesky_whitening(
    r: torch.Tensor, schedule: tuple[float, ...] = DAMPING_SCHEDULE, overwrite: bool = False
) -> Whitening:
    """Finds S with S Sᵀ ≈ R by Cholesky, escalating damping, then an eigen-root fallback.

    Each attempt factors R + λ·mean(diag R)·I for λ in ``schedule``; an attempt fails when
    Cholesky fails or a pivot is numerically zero. When every attempt fails the symmetric
    eigen-root with clamped eigenvalues is used. Never raises for a finite symmetric R.

    Args:
        r: n×n symmetric positive semi-definite matrix (any float dtype; used in float64).
        schedule: relative damping factors to try in order.
        overwrite: R may be symmetrized in place (saves an n×n copy; for a fresh R).

    Returns:
        The whitening; a warning is logged whenever damping or the fallback was needed.

    Raises:
        ValueError: if R contains NaN or infinity.
    """
    r = _checked_symmetric(r, overwrite)
    scale = _diag_scale(r)
    diagonal = r.diagonal().clone()
    for lam in schedule:
        damped = r if overwrite or not lam else r.clone()  # an owned R is damped in place
        if lam:
            damped.diagonal().copy_(diagonal + lam * scale)
        if overwrite:  # factored in place: no n×n temporary
            ok = _cholesky_lower_in_place(r)
            chol = r
        else:
            chol, info = torch.linalg.cholesky_ex(damped)
            ok = info.item() == 0
        del damped
        if ok and chol.diagonal().square().min() > MIN_PIVOT * scale:
            if lam > 0:
                logger.warning("second moment not positive definite; damped with λ=%g", lam)
            return Whitening(root=chol.tril_() if overwrite else chol, kind="cholesky",
                             damping=lam)
        if overwrite:
            _mirror_upper_to_lower(r)
    logger.warning("Cholesky failed at every damping level; using the clamped eigen-root")
    r.diagonal().copy_(diagonal)
    return eigen_whitening(r)


def _cholesky_lower_in_place(r: torch.Tensor, tile: int = TILE) -> bool:
    """Overwrites the lower triangle of symmetric R with its Cholesky factor L (blocked,
    right-looking, one tile column at a time); the strict upper triangle keeps R's values,
    so a failed attempt can be undone by :func:`_mirror_upper_to_lower`.

    Returns:
        False when a diagonal tile is not positive definite (R's lower part then holds
        partial results).
    """
    n = r.shape[0]
    for k in range(0, n, tile):
        end = min(k + tile, n)
        block = r[k:end, k:end]
        lower = block.tril()
        factor, info = torch.linalg.cholesky_ex(lower + lower.tril(-1).T)
        if info.item() != 0:
            return False
        block.copy_(factor + block.triu(1))
        if end == n:
            return True
        panel = r[end:, k:end]
        panel.copy_(torch.linalg.solve_triangular(factor.T, panel, upper=True, left=False))
        for j in range(end, n, tile):
            stop = min(j + tile, n)
            update = panel[j - end:] @ panel[j - end:stop - end].T
            r[stop:, j:stop].sub_(update[stop - j:])
            r[j:stop, j:stop].sub_(update[:stop - j].tril())
    return True


def _lower_tiles(n: int, tile: int) -> Iterator[tuple[slice, slice]]:
    """Yields (rows, cols) slices of the tiles on and below the diagonal of an n×n matrix."""
    for i in range(0, n, tile):
        for j in range(0, i + 1, tile):
            yield slice(i, i + tile), slice(j, j + tile)


def _mirror_upper_to_lower(r: torch.Tensor, tile: int = TILE) -> None:
    """Rebuilds R's strict lower triangle from its strict upper one, tile by tile (R's
    diagonal is restored by the caller)."""
    for rows, cols in _lower_tiles(r.shape[0], tile):
        target, source = r[rows, cols], r[cols, rows]
        if rows == cols:
            target.copy_(source.triu(1) + source.triu(1).T + target.diagonal().diag())
        else:
            target.copy_(source.T)


def eigen_whitening(r: torch.Tensor, floor: float = 1e-8) -> Whitening:
    """Returns the symmetric eigen-root S = Q diag(√λ) Qᵀ of R, eigenvalues clamped.

    Eigenvalues below ``floor · max(λ)`` are raised to that floor, so S is always
    invertible. Used as the Cholesky fallback and by SVD-LLM v2.

    Raises:
        ValueError: if R contains NaN or infinity.
    """
    r = _checked_symmetric(r)
    vals, vecs = torch.linalg.eigh(r)
    clamped = floored(vals, floor)
    damping = float((clamped - vals).max() / _diag_scale(r))
    root = (vecs * clamped.sqrt()) @ vecs.T
    inverse = (vecs / clamped.sqrt()) @ vecs.T
    return Whitening(root=(root + root.T) / 2, kind="eigen", damping=damping,
                     inverse=(inverse + inverse.T) / 2)


def floored(values: torch.Tensor, floor: float = 1e-8) -> torch.Tensor:
    """Returns ``values`` in float64 with entries below ``floor``·max raised to that floor
    (dead channels, zero rows, negative rounding noise), so they can be divided by.

    Raises:
        ValueError: if ``values`` contains NaN or infinity.
    """
    values = values.to(torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError("statistics contain NaN or infinity (non-finite activations)")
    return values.clamp_min(floor * float(values.max().clamp_min(torch.finfo(values.dtype).tiny)))


def _checked_symmetric(r: torch.Tensor, overwrite: bool = False, tile: int = TILE
                       ) -> torch.Tensor:
    """Returns (R + Rᵀ)/2 in float64; with ``overwrite`` a float64 R is symmetrized in
    place, tile by tile (the same values, without an n×n temporary)."""
    r = r.to(torch.float64)
    if not torch.isfinite(r).all():
        raise ValueError("statistics matrix contains NaN or infinity (non-finite activations)")
    if not overwrite:
        return (r + r.T).mul_(0.5)
    for rows, cols in _lower_tiles(r.shape[0], tile):
        lower, upper = r[rows, cols], r[cols, rows]
        mean = (lower + upper.T).mul_(0.5)
        lower.copy_(mean)
        upper.copy_(mean.T)
    return r


def _diag_scale(r: torch.Tensor) -> float:
    scale = float(r.diagonal().mean())
    return scale if scale > 0 else 1.0


@dataclass
class Decomposition:
    """An SVD in a whitened basis, ready to be cut at any rank without recomputation.

    The factored matrix is A = Tᵀ W S, where S is ``input_whitening`` and T is
    ``output_whitening`` (either may be absent, meaning the identity).

    Attributes:
        u: m×k left singular vectors (float64).
        sigma: k singular values, descending (float64).
        vh: k×n right singular vectors (float64).
        input_whitening: S, or None for an unwhitened input side.
        output_whitening: T, or None for an unwhitened output side.
    """

    u: torch.Tensor
    sigma: torch.Tensor
    vh: torch.Tensor
    input_whitening: Whitening | None = None
    output_whitening: Whitening | None = None

    def truncation_loss(self, rank: int) -> float:
        """Returns Σ_{i ≥ rank} σ_i², the whitened error of keeping ``rank`` components."""
        return float(self.sigma[rank:].square().sum())

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (W_u m×r, W_v r×n) in float64 with W ≈ W_u W_v in the original basis."""
        root = self.sigma[:rank].sqrt()
        w_u = self.u[:, :rank] * root
        w_v = root[:, None] * self.vh[:rank]
        if self.input_whitening is not None:
            w_v = self.input_whitening.right_inverse(w_v)
        if self.output_whitening is not None:
            w_u = self.output_whitening.left_inverse_transpose(w_u)
        return w_u, w_v


def decompose(
    weight: torch.Tensor,
    input_whitening: Whitening | None = None,
    output_whitening: Whitening | None = None,
    column_scale: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    cross: torch.Tensor | None = None,
) -> Decomposition:
    """Computes the SVD of W in the basis given by whitening and/or diagonal scalings.

    The factored matrix is A = Tᵀ · diag(row_scale) · W · diag(column_scale) · S, with every
    absent part taken as the identity. Diagonal scalings are folded into a whitening so that
    ``Decomposition.factors`` undoes them.

    With ``cross`` (the anchored objective, min ‖W X − W′ X′‖ over rank-r W′, the layer fed
    the compressed model's inputs X′ but fit to the original output W X): S is the root of
    R′ = E[x′x′ᵀ] and A = Tᵀ W C S⁻ᵀ with C = E[x x′ᵀ]. The factors then give W′ = Z S⁻¹
    for the best rank-r Z, and the error above the unconstrained optimum W C R′⁻¹ is Σ of
    the dropped σ². With X′ = X, C = R = S Sᵀ and A = Tᵀ W S: SVD-LLM.

    Args:
        weight: m×n weight (any float dtype; computed in float64).
        input_whitening: S with S Sᵀ = R, or None.
        output_whitening: T with T Tᵀ = C, or None.
        column_scale: n positive scales (ASVD), or None.
        row_scale: m positive scales (FWSVD), or None.
        cross: C = E[x x′ᵀ], n×n, for the anchored objective (needs ``input_whitening``).

    Returns:
        The decomposition; no side effects.

    Raises:
        ValueError: ``cross`` without ``input_whitening``.
    """
    a = weight.detach().to(torch.float64)
    if column_scale is not None:
        input_whitening = _diagonal_whitening(column_scale.to(a.device))
    if row_scale is not None:
        output_whitening = _diagonal_whitening(row_scale.to(a.device))
    if cross is not None:
        if input_whitening is None:
            raise ValueError("the anchored objective needs the compressed inputs' whitening")
        a = input_whitening.left_inverse((a @ cross.to(a)).T).T  # W C S⁻ᵀ
    elif input_whitening is not None:
        a = a @ input_whitening.root
    if output_whitening is not None:
        a = output_whitening.root.T @ a
    u, sigma, vh = torch.linalg.svd(a, full_matrices=False)
    return Decomposition(u, sigma, vh, input_whitening, output_whitening)


def component_scores(decomposition: Decomposition, grad: torch.Tensor) -> torch.Tensor:
    """First-order loss change of dropping each singular component, alone.

    With A = Tᵀ W S = Σ σ_i u_i v_iᵀ, dropping component i changes W by
    −σ_i T⁻ᵀ u_i v_iᵀ S⁻¹, so ΔL_i ≈ ⟨G, ΔW⟩ = −σ_i · u_iᵀ (T⁻¹ G S⁻ᵀ) v_i.

    Args:
        decomposition: the (whitened) SVD of W.
        grad: G = ∂L/∂W, same shape as W.

    Returns:
        ΔL_i for every component, float64, in spectral order. No side effects.
    """
    g = grad.detach().to(decomposition.u.device, torch.float64)
    if decomposition.input_whitening is not None:
        g = decomposition.input_whitening.left_inverse(g.T).T  # G S⁻ᵀ
    if decomposition.output_whitening is not None:
        g = decomposition.output_whitening.left_inverse(g)  # T⁻¹ G S⁻ᵀ
    projected = (decomposition.u * (g @ decomposition.vh.T)).sum(0)
    return -decomposition.sigma * projected


def _diagonal_whitening(scale: torch.Tensor) -> Whitening:
    # A diagonal matrix is its own lower-triangular Cholesky factor.
    return Whitening(root=torch.diag(scale.to(torch.float64)), kind="cholesky", damping=0.0)


def break_even_rank(m: int, n: int) -> int:
    """Returns r* = floor((mn − 1)/(m + n)): the largest rank whose factors save parameters."""
    return (m * n - 1) // (m + n)


def uniform_rank(m: int, n: int, ratio: float) -> int:
    """Returns r = floor((1 − ρ)·mn/(m + n)), the rank that removes a fraction ρ of m·n."""
    return max(1, math.floor((1.0 - ratio) * m * n / (m + n)))


def factored_params(m: int, n: int, rank: int | None) -> int:
    """Returns the parameters a module keeps: r(m+n) when factored, m·n when dense (None)."""
    return m * n if rank is None else rank * (m + n)


def reconstruction_error(weight: torch.Tensor, approx: torch.Tensor, r: torch.Tensor) -> float:
    """Returns tr((W−W′) R (W−W′)ᵀ) = ‖(W−W′)X‖²_F / N in float64."""
    d = (weight.to(torch.float64) - approx.to(torch.float64))
    return float(torch.einsum("ij,jk,ik->", d, r.to(torch.float64), d))
