"""FWSVD (Hsu et al., 2022): Fisher-weighted SVD, output rows weighted by the summed
Fisher information of their weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core import linalg
from ..errors import ConfigError
from .base import GRAD_BATCH_HELP, GRAD_SAMPLES_HELP, MethodConfig, MethodSpec, setting


@dataclass(frozen=True)
class FWSVDConfig(MethodConfig):
    """FWSVD: weight output row i by √I_i, I_i = Σ_batches Σ_j (∂L_b/∂W_ij)² (the Fisher
    diagonal summed over the row), truncate diag(√I)·W, unscale; uniform ranks.

    Attributes:
        grad_samples: calibration samples used (None = all).
        grad_batch_size: samples per gradient (1: per-sample Fisher, as in FWSVD).
    """

    name: ClassVar[str] = "fwsvd"
    needs_row_fisher: ClassVar[bool] = True
    grad_samples: int | None = setting(None, GRAD_SAMPLES_HELP)
    grad_batch_size: int = setting(1, GRAD_BATCH_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grad_batch_size < 1 or (self.grad_samples is not None and self.grad_samples < 1):
            raise ConfigError("grad_samples and grad_batch_size must be at least 1")


def decompose(config: FWSVDConfig, weight: torch.Tensor, inputs: Any,
           outputs: torch.Tensor | None) -> linalg.Decomposition:
    return linalg.decompose(weight, row_scale=linalg.floored(outputs).sqrt())


SPEC = MethodSpec(FWSVDConfig, decompose)
