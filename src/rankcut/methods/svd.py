"""Plain SVD: the truncated SVD of each weight, uniform ranks (the unweighted baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core import linalg
from .base import MethodConfig, MethodSpec


@dataclass(frozen=True)
class SVDConfig(MethodConfig):
    """Plain truncated SVD of each weight, uniform ranks."""

    name: ClassVar[str] = "svd"


def decompose(config: MethodConfig, weight: torch.Tensor, inputs: Any,
               outputs: Any = None) -> linalg.Decomposition:
    return linalg.decompose(weight)


SPEC = MethodSpec(SVDConfig, decompose)
