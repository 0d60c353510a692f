"""What every method shares: the settings helper, the base config, and the record a
method registers (its config class, its decomposition, its component score)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from ..core import linalg
from ..errors import ConfigError


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None,
            flag: bool = True) -> Any:
    """A config field and what the command line shows for it: ``cli.py`` derives one flag
    per setting (``--min-rank`` for ``min_rank``) with this ``help`` and ``choices``;
    ``flag=False`` keeps a setting off the command line."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


GRAD_SAMPLES_HELP = "calibration samples used for gradients (unset: all)"
GRAD_BATCH_HELP = "samples per gradient pass: with --stream it sets the head's logits memory"


@dataclass(frozen=True)
class MethodConfig:
    """Settings shared by every method.

    Attributes:
        ratio: fraction of target-layer parameters to remove, in (0, 1).
        sequential: feed each decoder block the outputs of the already-compressed blocks
            before it (instead of the original model's activations).
    """

    name: ClassVar[str] = ""
    needs_input_stats: ClassVar[bool] = False
    needs_output_stats: ClassVar[bool] = False
    needs_row_fisher: ClassVar[bool] = False
    # "uniform"; "global": ranks chosen across the model from loss gradients;
    # "truncation-loss": per module type from each matrix's truncation loss (SVD-LLM v2)
    allocation: ClassVar[str] = "uniform"
    ratio: float = setting(0.2, "fraction of target-layer parameters to remove, in (0, 1)")
    sequential: bool = setting(False, "feed each block the already-compressed blocks' outputs")

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"ratio must be in the open interval (0, 1); got {self.ratio!r}")

    def settings(self) -> dict[str, Any]:
        """Returns the settings as a JSON-ready dict (written into the checkpoint)."""
        return asdict(self)


# (config, weight, input statistics, output-side statistics: the KL metric for io-svd,
# the row Fisher vector for fwsvd) -> decomposition
Decomposer = Callable[[MethodConfig, torch.Tensor, Any, Any], linalg.Decomposition]
Scorer = Callable[[MethodConfig, linalg.Decomposition, torch.Tensor], torch.Tensor]


def first_order(config: MethodConfig, decomposition: linalg.Decomposition,
                grad: torch.Tensor) -> torch.Tensor:
    """The default component score: the first-order change of the calibration loss."""
    return linalg.component_scores(decomposition, grad)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config class, its per-matrix decomposition (given the
    input and output statistics it asked for) and, for global allocation, its per-component
    score (given the decomposition and the loss gradient)."""

    config_cls: type[MethodConfig]
    decompose: Decomposer
    score: Scorer = first_order
