"""SVD-LLM (Wang et al., 2024) and SVD-LLM v2 (Wang et al., 2025): truncation-aware
whitening of each layer's inputs, then the SVD in the whitened space. v1 cuts every
matrix to the same kept fraction; v2 whitens by the symmetric eigen-root and gives each
module type its rank from the matrices' theoretical truncation loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core import linalg
from ..errors import ConfigError
from .base import MethodConfig, MethodSpec, setting

OBJECTIVES = ("plain", "anchored")


@dataclass(frozen=True)
class SVDLLMConfig(MethodConfig):
    """SVD-LLM: truncation-aware input whitening (Cholesky of R), uniform ranks."""

    name: ClassVar[str] = "svd-llm"
    needs_input_stats: ClassVar[bool] = True
    objective: str = setting("plain", "plain: fit W x on the original inputs; anchored: then "
                             "cut each layer again at its rank in forward order, fitting W x "
                             "from inputs x' of the compressed model (AA-SVD)", OBJECTIVES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of "
                              f"{', '.join(OBJECTIVES)}")

    @property
    def anchored(self) -> bool:
        """Whether the layers are cut again by the anchored objective once ranks are set."""
        return self.objective == "anchored"


@dataclass(frozen=True)
class SVDLLMV2Config(SVDLLMConfig):
    """SVD-LLM v2: whitening by the symmetric eigen-root of R (no Cholesky), and
    heterogeneous ranks per module type from each matrix's theoretical truncation loss,
    repaired to the exact global budget (``allocation.loss_balanced_ranks``)."""

    name: ClassVar[str] = "svd-llm-v2"
    allocation: ClassVar[str] = "truncation-loss"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sequential:
            raise ConfigError("svd-llm-v2 allocates ranks across the model and cannot run "
                              "sequentially")


def whitened_svd(config: MethodConfig, weight: torch.Tensor,
                 inputs: linalg.SecondMoment | None, outputs: Any = None) -> linalg.Decomposition:
    """The SVD of W S, S the Cholesky root of the input second moment R (damped, with the
    eigen-root fallback); R's sums are consumed when no other module shares them."""
    whitening = linalg.cholesky_whitening(inputs.mean(), overwrite=True)
    return linalg.decompose(weight, input_whitening=whitening)


def eigen_whitened_svd(config: MethodConfig, weight: torch.Tensor,
                       inputs: linalg.SecondMoment | None, outputs: Any = None
                       ) -> linalg.Decomposition:
    """The SVD of W S, S the clamped symmetric eigen-root of R (SVD-LLM v2)."""
    return linalg.decompose(weight, input_whitening=linalg.eigen_whitening(inputs.mean()))


SPEC = MethodSpec(SVDLLMConfig, whitened_svd)
V2_SPEC = MethodSpec(SVDLLMV2Config, eigen_whitened_svd)
