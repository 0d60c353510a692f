"""IO-SVD: whitening on both sides (inputs by their second moment, outputs by the KL
metric of the top-K next-token distribution), then the global selection of the zero-sum
method in that basis, optionally with hybrid int8 rows (``core.hybrid``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core import linalg
from ..core.fisher import KL_MODES
from ..core.hybrid import REMAPS
from ..errors import ConfigError
from .base import MethodConfig, MethodSpec, setting
from .zero_sum import ZeroSumConfig

#: Component scores of ``IOSVDConfig.score``.
SCORES = ("first", "second", "both")


@dataclass(frozen=True)
class IOSVDConfig(ZeroSumConfig):
    """IO-SVD: whitening on both sides — inputs by their second moment R, outputs by the
    KL metric C back-propagated from the original model's top-K next-token distribution —
    then the global selection of the zero-sum method in that two-sided basis.

    Attributes:
        top_k: K, the most likely next tokens the KL metric keeps at each position.
        kl_mode: ``"exact"`` (K backward passes per batch) or ``"sample"`` (one pass, one
            token drawn per position).
        score: component score used by the selection: ``"first"`` (first-order change of
            the calibration loss), ``"second"`` (½σ², the second-order KL increase;
            default: lowest perplexity at ρ = 0.4 and 0.6 on SmolLM2, and no loss backward
            pass) or ``"both"`` (their sum).
        seed: seed of the random signs / samples of the KL pseudo-gradients.
        remap: None (pure low-rank, 16-bit factors), ``"classic"`` or ``"loss-aware"``
            (hybrid int8 rows, see ``rankcut.core.hybrid``); with a remap, ``ratio`` is the
            reduction of the target layers' bytes relative to 16-bit dense weights.
    """

    name: ClassVar[str] = "io-svd"
    needs_output_stats: ClassVar[bool] = True
    top_k: int = setting(5, "next tokens kept by the KL output metric")
    kl_mode: str = setting("sample", "exact: K backward passes per batch; sample: one",
                           KL_MODES)
    score: str = setting("second", "component score: first-order loss change, second-order "
                                   "KL increase, or their sum", SCORES)
    seed: int = setting(0, "seed of the KL draws", flag=False)  # --seed is the calibration's
    remap: str | None = setting(None, "store some factor rows in int8; --ratio is then the "
                                      "byte reduction of the target layers", REMAPS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1; got {self.top_k}")
        if self.kl_mode not in KL_MODES:
            raise ConfigError(f"unknown kl_mode {self.kl_mode!r}; choose one of "
                              f"{', '.join(KL_MODES)}")
        if self.score not in SCORES:
            raise ConfigError(f"unknown score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.remap is not None and self.remap not in REMAPS:
            raise ConfigError(f"unknown remap {self.remap!r}; choose one of {', '.join(REMAPS)}")
        if self.remap is not None and self.anchored:
            raise ConfigError("the anchored objective keeps 16-bit factors: it chooses no int8 "
                              "rows; drop --remap or use --objective plain")

    @property
    def needs_loss_gradients(self) -> bool:
        """The second-order score alone needs no G (nor does anything but a loss-aware
        remap), which saves the weight-gradient backward pass."""
        return self.score != "second" or self.remap == "loss-aware"


def decompose(config: MethodConfig, weight: torch.Tensor, inputs: linalg.SecondMoment | None,
              outputs: linalg.SecondMoment | None) -> linalg.Decomposition:
    """The SVD of Tᵀ W S: S the Cholesky root of the input moment R, T that of the KL
    output metric C (both damped, with the eigen-root fallback)."""
    return linalg.decompose(
        weight, input_whitening=linalg.cholesky_whitening(inputs.mean(), overwrite=True),
        output_whitening=linalg.cholesky_whitening(outputs.mean(), overwrite=True))


def score(config: IOSVDConfig, decomposition: linalg.Decomposition,
          grad: torch.Tensor) -> torch.Tensor:
    """The component score of ``config.score``: first-order loss change, ½σ², or both."""
    first = linalg.component_scores(decomposition, grad) if config.score != "second" else 0.0
    second = 0.5 * decomposition.sigma.square() if config.score != "first" else 0.0
    return first + second


SPEC = MethodSpec(IOSVDConfig, decompose, score)
