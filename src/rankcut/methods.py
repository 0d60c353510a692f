"""Compression methods: one frozen config dataclass per method and a small registry.

A method says which statistics it needs and how to decompose one weight matrix given them;
the pipeline (``compression.pipeline``) gathers the statistics and applies the result. Adding a
method means writing a config class and a decompose function, then registering them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch

from .core import linalg
from .core.allocation import RULES
from .core.fisher import KL_MODES
from .core.hybrid import REMAPS
from .errors import ConfigError


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None,
            flag: bool = True) -> Any:
    """A config field and what the command line shows for it: ``cli.py`` derives one flag
    per setting (``--min-rank`` for ``min_rank``) with this ``help`` and ``choices``;
    ``flag=False`` keeps a setting off the command line."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


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


@dataclass(frozen=True)
class SVDConfig(MethodConfig):
    """Plain truncated SVD of each weight, uniform ranks."""

    name: ClassVar[str] = "svd"


@dataclass(frozen=True)
class SVDLLMConfig(MethodConfig):
    """SVD-LLM: truncation-aware input whitening (Cholesky of R), uniform ranks."""

    name: ClassVar[str] = "svd-llm"
    needs_input_stats: ClassVar[bool] = True


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


GRAD_SAMPLES_HELP = "calibration samples used for gradients (unset: all)"
GRAD_BATCH_HELP = "samples per gradient pass: with --stream it sets the head's logits memory"


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
        for key in ("min_rank", "stages", "grad_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1; got {getattr(self, key)}")
        if self.grad_samples is not None and self.grad_samples < 1:
            raise ConfigError(f"grad_samples must be at least 1; got {self.grad_samples}")

    @property
    def needs_loss_gradients(self) -> bool:
        """Whether the allocation reads G = ∂L/∂W (the component scores do)."""
        return True


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

    @property
    def needs_loss_gradients(self) -> bool:
        """The second-order score alone needs no G (nor does anything but a loss-aware
        remap), which saves the weight-gradient backward pass."""
        return self.score != "second" or self.remap == "loss-aware"

# (config, weight, input statistics, output-side statistics: the KL metric for io-svd,
# the row Fisher vector for fwsvd) -> decomposition
Decomposer = Callable[[MethodConfig, torch.Tensor, Any, Any], linalg.Decomposition]
Scorer = Callable[[MethodConfig, linalg.Decomposition, torch.Tensor], torch.Tensor]


def _first_order(config: MethodConfig, decomposition: linalg.Decomposition,
                 grad: torch.Tensor) -> torch.Tensor:
    return linalg.component_scores(decomposition, grad)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config class, its per-matrix decomposition (given the
    input and output statistics it asked for) and, for global allocation, its per-component
    score (given the decomposition and the loss gradient)."""

    config_cls: type[MethodConfig]
    decompose: Decomposer
    score: Scorer = _first_order


def _plain_svd(config: MethodConfig, weight: torch.Tensor, inputs: Any,
               outputs: Any = None) -> linalg.Decomposition:
    return linalg.decompose(weight)


def _svd_llm(config: MethodConfig, weight: torch.Tensor, inputs: linalg.SecondMoment | None,
             outputs: Any = None) -> linalg.Decomposition:
    whitening = linalg.cholesky_whitening(inputs.mean(), overwrite=True)
    return linalg.decompose(weight, input_whitening=whitening)


def _asvd(config: ASVDConfig, weight: torch.Tensor, inputs: linalg.SecondMoment | None,
          outputs: Any = None) -> linalg.Decomposition:
    return linalg.decompose(weight, column_scale=linalg.floored(inputs.mean_abs()) ** config.alpha)


def _fwsvd(config: FWSVDConfig, weight: torch.Tensor, inputs: Any,
           outputs: torch.Tensor | None) -> linalg.Decomposition:
    return linalg.decompose(weight, row_scale=linalg.floored(outputs).sqrt())


def _svd_llm_v2(config: MethodConfig, weight: torch.Tensor,
                inputs: linalg.SecondMoment | None, outputs: Any = None) -> linalg.Decomposition:
    return linalg.decompose(weight, input_whitening=linalg.eigen_whitening(inputs.mean()))


def _io_svd(config: MethodConfig, weight: torch.Tensor, inputs: linalg.SecondMoment | None,
            outputs: linalg.SecondMoment | None) -> linalg.Decomposition:
    return linalg.decompose(
        weight, input_whitening=linalg.cholesky_whitening(inputs.mean(), overwrite=True),
        output_whitening=linalg.cholesky_whitening(outputs.mean(), overwrite=True))


def _io_svd_score(config: IOSVDConfig, decomposition: linalg.Decomposition,
                  grad: torch.Tensor) -> torch.Tensor:
    first = linalg.component_scores(decomposition, grad) if config.score != "second" else 0.0
    second = 0.5 * decomposition.sigma.square() if config.score != "first" else 0.0
    return first + second


METHODS: dict[str, MethodSpec] = {
    SVDConfig.name: MethodSpec(SVDConfig, _plain_svd),
    SVDLLMConfig.name: MethodSpec(SVDLLMConfig, _svd_llm),
    ASVDConfig.name: MethodSpec(ASVDConfig, _asvd),
    FWSVDConfig.name: MethodSpec(FWSVDConfig, _fwsvd),
    SVDLLMV2Config.name: MethodSpec(SVDLLMV2Config, _svd_llm_v2),
    ZeroSumConfig.name: MethodSpec(ZeroSumConfig, _svd_llm),
    IOSVDConfig.name: MethodSpec(IOSVDConfig, _io_svd, _io_svd_score),
}

#: The method ``rankcut compress`` uses when none is named.
DEFAULT_METHOD = IOSVDConfig.name


def method_spec(name: str) -> MethodSpec:
    """Returns the registered method called ``name``.

    Raises:
        ConfigError: no method has that name; the message lists the valid names.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def make_config(name: str, **settings: Any) -> MethodConfig:
    """Builds the config of method ``name`` from keyword settings, ignoring ``None`` values.

    Raises:
        ConfigError: unknown method, unknown setting, or a value out of range.
    """
    cls = method_spec(name).config_cls
    known = {f.name for f in fields(cls)}
    given = {k: v for k, v in settings.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"method {name!r} has no setting(s) {unknown}; it takes {sorted(known)}")
    return cls(**given)
