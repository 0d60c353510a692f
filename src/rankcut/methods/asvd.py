"""ASVD (Yuan et al., 2023): activation-aware SVD with per-input-channel scales."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core import linalg
from ..errors import ConfigError
from .base import MethodConfig, MethodSpec, setting


@dataclass(frozen=True)
class ASVDConfig(MethodConfig):
    """ASVD: scale input channel j by s_j = (mean |x_j|)^α, truncate W·diag(s), unscale.

    Attributes:
        alpha: the exponent α (0 gives plain SVD).
    """

    name: ClassVar[str] = "asvd"
    needs_input_stats: ClassVar[bool] = True
    alpha: float = setting(0.5, "exponent of the input-channel scales")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 2.0:
            raise ConfigError(f"alpha must be in [0, 2]; got {self.alpha!r}")


def decompose(config: ASVDConfig, weight: torch.Tensor, inputs: linalg.SecondMoment | None,
          outputs: Any = None) -> linalg.Decomposition:
    return linalg.decompose(weight, column_scale=linalg.floored(inputs.mean_abs()) ** config.alpha)


SPEC = MethodSpec(ASVDConfig, decompose)
