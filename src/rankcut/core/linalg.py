"""Pure math: statistics, whitening and truncated factorizations.

Every function here takes tensors and returns tensors; none touches a model, a hook or a
file. The pipeline (``rankcut.compression.pipeline``) feeds them the statistics it gathered.

Notation follows DESIGN.md: a linear layer computes ``y = W x`` with ``W`` of shape m×n
(out×in); ``R = (1/N) Σ x xᵀ`` is the n×n input second moment; ``S Sᵀ = R``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: Relative damping factors tried, in order, before the eigen-root fallback.
DAMPING_SCHEDULE: tuple[float, ...] = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: A Cholesky factor whose smallest squared pivot is below this fraction of mean(diag R)
#: is treated as numerically singular (condition number above ~1e10).
MIN_PIVOT = 1e-10


@dataclass
class SecondMoment:
    """Running input statistics of one layer, kept as (sum, count) in float64.

    Attributes:
        xx: Σ x xᵀ over all tokens seen, n×n float64.
        abs_sum: Σ |x| over all tokens seen, n float64 (ASVD's channel scales).
        count: number of tokens seen.
        consumable: ``mean()`` may turn Σ x xᵀ into the mean in place and let go of it
            (set by a caller that will not read these statistics again; saves an n×n copy).
    """

    xx: torch.Tensor
    abs_sum: torch.Tensor
    count: int = 0
    consumable: bool = False

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu") -> SecondMoment:
        """Returns empty statistics for inputs of dimension ``n``."""
        return cls(xx=torch.zeros(n, n, dtype=torch.float64, device=device),
                   abs_sum=torch.zeros(n, dtype=torch.float64, device=device))

    def update(self, x: torch.Tensor, new_tokens: bool = True) -> None:
        """Adds a batch of vectors ``x`` (any leading shape, last dim n). Mutates self.

        ``new_tokens=False`` adds the outer products without counting the tokens again
        (the 2nd…K-th term of a per-token sum such as IO-SVD's Σ_k b_k b_kᵀ).

        Float64 input is multiplied in float64; lower precisions are multiplied in float32
        (the activations carry no more than that) and each batch's product is added to
        the float64 sum: the long accumulation keeps float64 accuracy at half the cost.
        """
        flat = x.reshape(-1, x.shape[-1]).to(self.xx.device)
        if flat.dtype == torch.float64:
            self.xx.addmm_(flat.T, flat)
        else:
            flat = flat.float()
            product = flat.T @ flat
            for rows in range(0, product.shape[0], 1024):  # no n×n float64 temporary
                self.xx[rows:rows + 1024].add_(product[rows:rows + 1024])
        if new_tokens:
            self.abs_sum.add_(flat.abs().sum(0, dtype=torch.float64))
            self.count += flat.shape[0]

    def merge(self, other: SecondMoment) -> None:
        """Adds another accumulator's sums and counts into this one. Mutates self."""
        self.xx.add_(other.xx.to(self.xx.device))
        self.abs_sum.add_(other.abs_sum.to(self.abs_sum.device))
        self.count += other.count

    def mean(self) -> torch.Tensor:
        """Returns R = Σ x xᵀ / N (float64); a ``consumable`` accumulator is divided in
        place and gives its matrix away (``xx`` becomes None).

        Raises:
            ValueError: no token was seen, or the matrix was already given away.
        """
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer")
        if self.xx is None:
            raise ValueError("these statistics were consumed by an earlier mean()")
        if not self.consumable:
            return self.xx / self.count
        mean, self.xx = self.xx.div_(self.count), None
        return mean

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
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0 and chol.diagonal().square().min() > MIN_PIVOT * scale:
            if lam > 0:
                logger.warning("second moment not positive definite; damped with λ=%g", lam)
            return Whitening(root=chol, kind="cholesky", damping=lam)
    logger.warning("Cholesky failed at every damping level; using the clamped eigen-root")
    r.diagonal().copy_(diagonal)
    return eigen_whitening(r)


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


def _checked_symmetric(r: torch.Tensor, overwrite: bool = False, tile: int = 1024
                       ) -> torch.Tensor:
    """Returns (R + Rᵀ)/2 in float64; with ``overwrite`` a float64 R is symmetrized in
    place, tile by tile (the same values, without an n×n temporary)."""
    r = r.to(torch.float64)
    if not torch.isfinite(r).all():
        raise ValueError("statistics matrix contains NaN or infinity (non-finite activations)")
    if not overwrite:
        return (r + r.T).mul_(0.5)
    for i in range(0, r.shape[0], tile):
        for j in range(i, r.shape[0], tile):
            upper, lower = r[i:i + tile, j:j + tile], r[j:j + tile, i:i + tile]
            mean = (upper + lower.T).mul_(0.5)
            upper.copy_(mean)
            lower.copy_(mean.T)
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
) -> Decomposition:
    """Computes the SVD of W in the basis given by whitening and/or diagonal scalings.

    The factored matrix is A = Tᵀ · diag(row_scale) · W · diag(column_scale) · S, with every
    absent part taken as the identity. Diagonal scalings are folded into a whitening so that
    ``Decomposition.factors`` undoes them.

    Args:
        weight: m×n weight (any float dtype; computed in float64).
        input_whitening: S with S Sᵀ = R, or None.
        output_whitening: T with T Tᵀ = C, or None.
        column_scale: n positive scales (ASVD), or None.
        row_scale: m positive scales (FWSVD), or None.

    Returns:
        The decomposition; no side effects.
    """
    a = weight.detach().to(torch.float64)
    if column_scale is not None:
        input_whitening = _diagonal_whitening(column_scale.to(a.device))
    if row_scale is not None:
        output_whitening = _diagonal_whitening(row_scale.to(a.device))
    if input_whitening is not None:
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
