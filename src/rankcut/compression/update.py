"""SVD-LLM's parameter update after truncation, usable after any method.

Two stages, each with a frozen config dataclass:

* ``refit``: layer by layer, the compressed model's own activations x_c are fed to each
  factorized layer and W_u is re-solved in closed form (W_v fixed) so the layer's outputs
  match the original layer's outputs: W x_c (SVD-LLM's objective, the default) or W x_o on
  the original model's activations (which also tries to undo the error of earlier layers).
  It runs block by block over the engine's executor (``refit_blocks``), in memory and
  streamed alike, with the original weights and both activation streams in the work folder.
* ``lora``: sequential low-rank fine-tuning with ``peft``: LoRA on every W_u (W_v frozen),
  merge; then on every W_v (W_u frozen), merge. It trains on the calibration text's
  next-token loss or, with ``teacher_top_k``, distills the uncompressed model's top-K
  next-token probabilities on the same text (gathered before the compression starts).

Both keep ranks and int8 layouts; int8 rows are quantized again from the updated factors.
A block-wise update (``refit`` or ``block``, the block refinement of ``refine.py``) can be
followed by ``lora`` in one run: ``--update block+lora`` (an :class:`UpdateChain`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.data import Calibration, as_calibration
from ..errors import ConfigError
from ..methods import setting
from ..nn.modules import LowRankLinear
from .blockpass import PairedMoments, rework_blocks, swap_factors
from .engine import BlockRun, UpdateReport
from .refine import BlockRefineConfig, refine_blocks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefitConfig:
    """Closed-form refit of W_u on the compressed model's activations.

    Attributes:
        damping: ridge λ, relative to the mean diagonal of the rank-space second moment.
        target: ``"compressed"`` fits W x_c, the original layer applied to the compressed
            model's own inputs (SVD-LLM); ``"original"`` fits W x_o, the original layer's
            outputs in the original model.
    """

    name: ClassVar[str] = "refit"
    whole_model: ClassVar[bool] = False
    needs_output_metric: ClassVar[bool] = False
    damping: float = setting(1e-6, "ridge λ, relative to the mean diagonal of the rank-space "
                                   "second moment")
    target: str = setting("compressed", "fit the original layer applied to the compressed "
                                        "model's inputs, or its outputs in the original model",
                          ("compressed", "original"))

    def __post_init__(self) -> None:
        if not 0.0 <= self.damping < 1.0:
            raise ConfigError(f"refit damping must be in [0, 1); got {self.damping!r}")
        if self.target not in ("compressed", "original"):
            raise ConfigError(f"refit target must be 'compressed' or 'original'; "
                              f"got {self.target!r}")

    def settings(self) -> dict[str, Any]:
        """Returns the stage name and settings as a JSON-ready dict."""
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class LoRAUpdateConfig:
    """Sequential LoRA: W_u first (W_v frozen), merge, then W_v (W_u frozen), merge.

    Attributes:
        rank: LoRA rank.
        alpha: LoRA scaling numerator (the update is scaled by alpha / rank).
        steps: optimizer steps per stage (two stages).
        batch_size: calibration samples per step, drawn with a seeded generator.
        lr: AdamW learning rate.
        seed: seed of the LoRA initialization and of the batch draws.
        teacher_top_k: 0 trains on the next-token loss of the calibration text; K > 0
            distills the uncompressed model instead: the loss is the KL divergence from the
            original model's next-token distribution to the compressed model's at every
            position of the calibration text, over the original's K most likely tokens and
            one bucket for all the others (:func:`distill_loss`).
    """

    name: ClassVar[str] = "lora"
    whole_model: ClassVar[bool] = True  # trains the whole model at once: in memory only
    needs_output_metric: ClassVar[bool] = False
    rank: int = setting(8, "LoRA rank")
    alpha: float = setting(16.0, "LoRA scaling numerator (the update is scaled by alpha / rank)")
    steps: int = setting(20, "optimizer steps per LoRA stage")
    batch_size: int = setting(4, "calibration samples per LoRA step")
    lr: float = setting(3e-4, "LoRA learning rate")
    seed: int = setting(0, "seed of the LoRA initialization and of the batch draws")
    teacher_top_k: int = setting(0, "0: train on the calibration text's next-token loss; K: "
                                    "distill the uncompressed model's K most likely next "
                                    "tokens at every position instead")

    def __post_init__(self) -> None:
        for key in ("rank", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"lora {key} must be at least 1; got {getattr(self, key)}")
        if self.teacher_top_k < 0:
            raise ConfigError(f"lora teacher_top_k must be 0 (no teacher) or a positive K; "
                              f"got {self.teacher_top_k}")
        if not self.lr > 0:
            raise ConfigError(f"lora lr must be positive; got {self.lr!r}")

    def settings(self) -> dict[str, Any]:
        """Returns the stage name and settings as a JSON-ready dict."""
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class UpdateChain:
    """A block-wise update, then the LoRA update (``--update block+lora``, ``refit+lora``).

    Attributes:
        steps: the two updates, in the order they run.
    """

    steps: tuple

    def __post_init__(self) -> None:
        if (len(self.steps) != 2 or not isinstance(self.steps[0], BLOCKWISE)
                or not isinstance(self.steps[1], LoRAUpdateConfig)):
            raise ConfigError("an update chain is a block-wise update (refit or block) then "
                              f"lora; got {'+'.join(step.name for step in self.steps)!r}")

    @property
    def name(self) -> str:
        """The steps' names joined by ``+`` (``block+lora``)."""
        return "+".join(step.name for step in self.steps)

    @property
    def whole_model(self) -> bool:
        """Whether a step trains the whole model at once (in memory only)."""
        return any(step.whole_model for step in self.steps)

    @property
    def needs_output_metric(self) -> bool:
        """Whether the first step weights its error by IO-SVD's output metric."""
        return self.steps[0].needs_output_metric

    def settings(self) -> dict[str, Any]:
        """Returns the chain's name and each step's settings as a JSON-ready dict."""
        return {"name": self.name, "steps": [step.settings() for step in self.steps]}


UpdateConfig = RefitConfig | BlockRefineConfig | LoRAUpdateConfig | UpdateChain
UPDATES: dict[str, type] = {cls.name: cls for cls in (RefitConfig, BlockRefineConfig,
                                                      LoRAUpdateConfig)}
#: The updates that run block by block over the engine's executor (in memory and streamed).
BLOCKWISE = (RefitConfig, BlockRefineConfig)
#: The names ``--update`` takes: one update, or a block-wise one then lora.
UPDATE_NAMES = (*UPDATES, *(f"{cls.name}+lora" for cls in BLOCKWISE))


def make_update(name: str | None, **settings: Any) -> UpdateConfig | None:
    """Builds the update config called ``name`` (None or ``"none"``: no update). Settings
    may carry their update's name as a prefix (``block_lr``, as the flags do); a chain's
    (``block+lora``) must, to say which step each belongs to.

    Raises:
        ConfigError: unknown update or setting, or a value out of range.
    """
    if name in (None, "none"):
        return None
    if name not in UPDATE_NAMES:
        raise ConfigError(f"unknown update {name!r}; choose one of none, "
                          f"{', '.join(UPDATE_NAMES)}")
    given = {k: v for k, v in settings.items() if v is not None}
    if "+" in name:
        steps = name.split("+")
        unknown = [k for k in given if k.partition("_")[0] not in steps]
        if unknown:
            raise ConfigError(f"update {name!r}: prefix each setting with its step "
                              f"({steps[0]}_..., {steps[1]}_...); got {unknown[0]!r}")
        return UpdateChain(tuple(make_update(step, **{
            k.partition("_")[2]: v for k, v in given.items() if k.partition("_")[0] == step})
            for step in steps))
    given = {key.removeprefix(f"{name}_"): value for key, value in given.items()}
    try:
        return UPDATES[name](**given)
    except TypeError as exc:
        raise ConfigError(f"update {name!r}: {exc}") from None


def keeps_blocks(update: UpdateConfig | None) -> bool:
    """Whether ``update`` begins with a block-wise pass, so the compression must keep its
    blocks and their original weights (``refit=True`` of the block run)."""
    first = update.steps[0] if isinstance(update, UpdateChain) else update
    return isinstance(first, BLOCKWISE)


def needs_block_metric(update: UpdateConfig | None) -> bool:
    """Whether ``update`` weights the block error by IO-SVD's output metric, so the
    compression must write each block's metric (``block_metric=True`` of the block run)."""
    return update is not None and update.needs_output_metric


def apply_update(run: BlockRun, config: UpdateConfig, calibration: torch.Tensor | Calibration,
                 batch_size: int = 8, teacher: Teacher | None = None) -> UpdateReport:
    """Runs ``config``'s update on the blocks ``run`` compressed.

    Args:
        run: the block run of the compression (``pipeline.compress_blocks``; for a block-wise
            update it must have kept its blocks and originals: ``refit=True``).
        config: an update config (LoRA in memory only: it trains the whole model), or a
            chain of them; a chain's log tags every entry with its step's name (``update``).
        calibration: [num_samples, seqlen] token ids, or a ``Calibration`` (with images:
            the block-wise updates only).
        batch_size: samples per forward pass (refit).
        teacher: the uncompressed model's targets for a distilling LoRA step
            (:func:`lora_teacher`, gathered before the compression).

    Raises:
        ConfigError: no calibration, or image samples for the LoRA update.
    """
    if calibration is None or calibration.numel() == 0:
        raise ConfigError(f"the {config.name} update needs calibration token ids")
    calibration = as_calibration(calibration)
    if isinstance(config, UpdateChain):
        log = [{"update": step.name, **entry} for step in config.steps
               for entry in apply_update(run, step, calibration, batch_size, teacher).log]
    elif isinstance(config, RefitConfig):
        log = refit_blocks(run, config, calibration, batch_size)
    elif isinstance(config, BlockRefineConfig):
        log = refine_blocks(run, config, calibration)
    elif calibration.has_images:
        raise ConfigError("the lora update trains on text only; drop --calib-images or use "
                          "--update refit")
    else:
        log = lora_update(run.sm.model, calibration.input_ids, config, teacher)
    return UpdateReport(config.settings(), log)


# ---------------------------------------------------------------- closed-form refit


def refit_factor(weight: torch.Tensor, w_u: torch.Tensor, w_v: torch.Tensor,
                 moments: PairedMoments, damping: float = 1e-6
                 ) -> tuple[torch.Tensor, float, float, float]:
    """Solves min_U Σ‖W x_o − U W_v x_c‖² in float64 (ridge λ·mean diag), W_v fixed.

    With A = W_v Σcc W_vᵀ and B = W Σoc W_vᵀ the solution is U = B (A + λI)⁻¹. The
    error of a U is tr(W Σoo Wᵀ) − 2⟨U, B⟩ + ⟨U A, U⟩; the refit is kept only when it
    is not larger than the error of the current W_u, so it never increases the error.

    Returns:
        (the new W_u, or the given one when the refit would not lower the error, the mean
        error per token before, after, the mean of ‖W x_o‖² per token). Pure.
    """
    device = moments.cc.device
    w, u, v = (t.detach().to(device, torch.float64) for t in (weight, w_u, w_v))
    n = max(1, moments.count)
    oo, oc = moments.target_moments()
    a = v @ (moments.cc / n) @ v.T
    b = w @ (oc / n) @ v.T
    base = float(torch.einsum("ij,jk,ik->", w, oo / n, w))

    def error(candidate: torch.Tensor) -> float:
        return base - 2 * float((candidate * b).sum()) + float(((candidate @ a) * candidate).sum())

    lam = damping * float(a.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=device)
    chol, info = torch.linalg.cholesky_ex(a + lam * eye)
    if info.item() != 0:
        solution = torch.linalg.lstsq(a + lam * eye, b.T).solution.T
    else:
        solution = torch.cholesky_solve(b.T, chol).T
    before, after = error(u), error(solution)
    if not torch.isfinite(solution).all() or after > before:
        return w_u, before, before, base
    return solution, before, after, base


def refit_blocks(run: BlockRun, config: RefitConfig, calibration: Calibration,
                 batch_size: int) -> list[dict]:
    """Refits W_u of every factorized layer in the decoder blocks, block by block in forward
    order, over the executor of ``run`` (the compression's block run): a
    :func:`~rankcut.compression.blockpass.rework_blocks` pass.

    A layer's input is the compressed stream x_c *after* the layers before it (earlier
    blocks, and earlier layers of its own block such as q/k/v before o_proj) were refitted.
    Its target is the original layer applied to that input (``target="compressed"``) or,
    with ``target="original"``, the original layer's output on the original model's
    stream.

    Side effects: the refitted blocks replace the compressed ones (in the model, and in the
    work folder's shards); every block is committed (a rerun resumes).

    Returns:
        One {module, error_before, error_after, relative_after} entry per refitted layer.
    """
    return rework_blocks(run, "refit", calibration, batch_size, config.target == "original",
                         functools.partial(_refit_layer, config=config))


def _refit_layer(model: nn.Module, name: str, weight: torch.Tensor, moments: PairedMoments,
                 config: RefitConfig) -> dict:
    """Refits one layer's W_u (``weight``: the original layer's) and swaps the rebuilt
    layer in; returns its log entry."""
    layer: LowRankLinear = model.get_submodule(name)
    w_u, w_v = layer.factors()
    new_u, before, after, scale = refit_factor(weight, w_u, w_v, moments, config.damping)
    if new_u is not w_u:
        swap_factors(model, name, new_u, w_v)
    relative = after / max(scale, 1e-300)
    logger.info("refit %s: error %.4g -> %.4g (relative %.4f)", name, before, after, relative)
    return {"module": name, "error_before": before, "error_after": after,
            "relative_after": relative}


# ---------------------------------------------------------------- sequential LoRA


@dataclass(frozen=True)
class Teacher:
    """The uncompressed model's next-token targets on the calibration text.

    Attributes:
        probs: [num_samples, seqlen, K] float32, the K most likely tokens' probabilities
            (of the whole vocabulary's softmax: they sum to less than one) at every
            position.
        index: [num_samples, seqlen, K] int32, those tokens' ids.
    """

    probs: torch.Tensor
    index: torch.Tensor


def lora_teacher(model: nn.Module, update: UpdateConfig | None,
                 calibration: Calibration | None) -> Teacher | None:
    """Gathers the targets of ``update``'s LoRA step when it distills (``teacher_top_k``),
    from ``model`` before it is compressed: one no-grad forward per calibration sample, so
    memory holds one sample's logits. Returns None when no LoRA step distills."""
    lora = update.steps[-1] if isinstance(update, UpdateChain) else update
    if not isinstance(lora, LoRAUpdateConfig) or lora.teacher_top_k == 0:
        return None
    device = next(model.parameters()).device
    probs, index = [], []
    with torch.no_grad():
        for row in tqdm(calibration.input_ids, desc="lora teacher", unit="sample"):
            logits = model(input_ids=row[None].to(device), use_cache=False).logits[0]
            k = min(lora.teacher_top_k, logits.shape[-1])
            top, ids = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
            probs.append(top.cpu())
            index.append(ids.to(torch.int32).cpu())
    teacher = Teacher(torch.stack(probs), torch.stack(index))
    logger.info("lora teacher: the original model's top %d tokens hold %.1f%% of its "
                "next-token probability on the calibration text", k,
                100 * float(teacher.probs.sum(-1).mean()))
    return teacher


def distill_loss(logits: torch.Tensor, probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per position, averaged, over K + 1 outcomes: the teacher's K
    most likely tokens (``index`` [..., K], their probabilities ``probs``) and the rest of
    the vocabulary as one bucket (probability one minus their sum), for the student's
    next-token ``logits`` [..., V]. Keeping the rest's mass, rather than renormalizing the
    K, leaves the student as unsure as the teacher beyond its top K; with K = V it is the
    full KL divergence."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    top = log_probs.gather(-1, index.long())
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    teacher_rest = (1 - probs.sum(-1)).clamp_min(0)
    kl = (probs * (probs.clamp_min(1e-30).log() - top)).sum(-1)
    kl = kl + teacher_rest * (teacher_rest.clamp_min(1e-30).log() - rest)
    return kl.mean()


def lora_update(model: nn.Module, calibration: torch.Tensor,
                config: LoRAUpdateConfig, teacher: Teacher | None = None) -> list[dict]:
    """Sequential LoRA on the factors of every ``LowRankLinear`` (peft). Mutates ``model``.

    Each factorized layer is temporarily an ``nn.Sequential(W_v, W_u)`` of two linears;
    stage ``u`` trains LoRA adapters on every W_u (everything else frozen) and merges them,
    stage ``v`` does the same for every W_v. Batches are drawn from ``calibration`` with a
    seeded generator; each step's loss (the mean next-token loss, or with ``teacher`` the
    :func:`distill_loss` against its targets for the same samples) is logged. Parameter
    ``requires_grad`` flags and the global RNG state are restored afterwards.

    Raises:
        ConfigError: the config distills (``teacher_top_k``) but no teacher was given, or
            the teacher's targets do not match ``calibration``'s shape.

    Returns:
        One {stage, step, loss} entry per optimizer step.
    """
    if (teacher is None) != (config.teacher_top_k == 0):
        raise ConfigError("lora teacher_top_k > 0 needs the uncompressed model's targets "
                          "(lora_teacher), and only then")
    if teacher is not None and teacher.probs.shape[:2] != calibration.shape:
        raise ConfigError(f"lora teacher targets cover {tuple(teacher.probs.shape[:2])} "
                          f"positions, the calibration {tuple(calibration.shape)}")
    factored = {name: module for name, module in model.named_modules()
                if isinstance(module, LowRankLinear)}
    if not factored:
        raise ConfigError("the lora update needs a compressed model (no low-rank layers)")
    flags = {p: p.requires_grad for p in model.parameters()}
    for name, module in factored.items():
        model.set_submodule(name, _as_pair(module))
    log: list[dict] = []
    try:
        for number, (stage, index) in enumerate((("u", 1), ("v", 0))):
            targets = [f"{name}.{index}" for name in factored]
            log += _train_stage(model, targets, calibration, config, stage, number, teacher)
    finally:
        for name, module in factored.items():
            pair = model.get_submodule(name)
            if isinstance(pair, nn.Sequential):
                model.set_submodule(name, LowRankLinear.from_factors(
                    pair[1].weight.detach(), pair[0].weight.detach(), module.bias,
                    dtype=module.weight_u.dtype, plan=module.plan).to(module.weight_u.device))
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return log


def _as_pair(layer: LowRankLinear) -> nn.Sequential:
    """W_u W_v as two plain linears (dequantized, float32 for training)."""
    w_u, w_v = layer.factors()
    # built on the meta device, then filled: no random initialization, no RNG consumed
    down = nn.Linear(layer.in_features, layer.rank, bias=False, device="meta")
    up = nn.Linear(layer.rank, layer.out_features, bias=layer.bias is not None, device="meta")
    down, up = down.to_empty(device=w_v.device), up.to_empty(device=w_u.device)
    with torch.no_grad():
        down.weight.copy_(w_v.float())
        up.weight.copy_(w_u.float())
        if layer.bias is not None:
            up.bias.copy_(layer.bias.float())
    return nn.Sequential(down, up)


def _train_stage(model, targets, ids, config: LoRAUpdateConfig, stage: str,
                 number: int, teacher: Teacher | None) -> list[dict]:
    """Injects LoRA adapters on ``targets``, trains them, merges them into the weights."""
    from peft import LoraConfig, get_peft_model

    device = next(model.parameters()).device
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                      target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + number)
        wrapped = get_peft_model(model, lora)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    draws = torch.Generator().manual_seed(config.seed * 1000 + number)
    log = []
    for step in tqdm(range(config.steps), desc=f"lora {stage}", unit="step"):
        rows = torch.randint(ids.shape[0], (config.batch_size,), generator=draws)
        batch = ids[rows].to(device)
        if teacher is None:
            loss = wrapped(input_ids=batch, labels=batch, use_cache=False).loss
        else:
            loss = distill_loss(wrapped(input_ids=batch, use_cache=False).logits,
                                teacher.probs[rows].to(device), teacher.index[rows].to(device))
        if not torch.isfinite(loss):
            raise ConfigError(f"lora stage {stage}: loss became non-finite at step {step}; "
                              "lower --lora-lr")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        log.append({"stage": stage, "step": step, "loss": value})
        logger.info("lora %s step %d/%d: loss %.4f", stage, step + 1, config.steps, value)
    with torch.no_grad():
        merged = wrapped.merge_and_unload()
    if merged is not model:
        raise RuntimeError("peft returned a different model object after merging")
    return log
