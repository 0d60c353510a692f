"""Zero-Sum SVD: SVD-LLM whitening, then a global selection of singular components
across the model by their first-order effect on the calibration loss, keeping the
predicted total change near zero (``core.allocation``); optional correction stages
(``compression.correction``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..core.allocation import RULES
from ..errors import ConfigError
from .base import GRAD_BATCH_HELP, GRAD_SAMPLES_HELP, MethodSpec, setting
from .svd_llm import SVDLLMConfig, whitened_svd


@dataclass(frozen=True)
class ZeroSumConfig(SVDLLMConfig):
    """Zero-Sum SVD: SVD-LLM whitening, then global selection of singular components by
    their first-order effect on the calibration loss, keeping the predicted total near zero.

    Attributes:
        rule: ``"zero-sum"`` (two-heap rule) or ``"least-sensitive"`` (smallest |ΔL| first).
        min_rank: no matrix is cut below this rank.
        stages: 1 = truncate only; N > 1 adds up to N − 1 correct-and-re-truncate stages
            (a stage that cannot lower the calibration loss ends the sequence).
        grad_samples: calibration samples used for gradients (None = all).
        grad_batch_size: samples per forward/backward pass of the gradient computation.
    """

    name: ClassVar[str] = "zero-sum"
    allocation: ClassVar[str] = "global"
    rule: str = setting("zero-sum", "global selection rule", RULES)
    min_rank: int = setting(1, "rank floor per matrix")
    stages: int = setting(1, "1 = truncate only; N adds N-1 correct/re-truncate stages")
    grad_samples: int | None = setting(None, GRAD_SAMPLES_HELP)
    grad_batch_size: int = setting(4, GRAD_BATCH_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sequential:
            raise ConfigError("zero-sum selects ranks globally and cannot run sequentially")
        if self.rule not in RULES:
            raise ConfigError(f"unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if self.anchored and self.stages > 1:
            raise ConfigError("the anchored objective cuts the layers again once; it does not "
                              "combine with correction stages (use --stages 1)")
        for key in ("min_rank", "stages", "grad_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1; got {getattr(self, key)}")
        if self.grad_samples is not None and self.grad_samples < 1:
            raise ConfigError(f"grad_samples must be at least 1; got {self.grad_samples}")

    @property
    def needs_loss_gradients(self) -> bool:
        """Whether the allocation reads G = ∂L/∂W (the component scores do)."""
        return True


SPEC = MethodSpec(ZeroSumConfig, whitened_svd)
