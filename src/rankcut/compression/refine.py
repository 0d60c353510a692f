"""Block-wise refinement after truncation (``--update block``), after AA-SVD (arXiv
2604.02119) and LiLlama (arXiv 2412.16719).

In forward order, each compressed decoder block is tuned so that its output on the
compressed model's stream matches the original block's output on the original stream:
AdamW on the mean squared error, over the factors of its low-rank layers (and, with
``norms``, its norm weights). The calibration batches are split into training batches and a
held-out slice; the held-out error is measured before training and after every epoch, the
best epoch's parameters are kept, and a block whose held-out error never improves (or,
with ``min_gain``, never improves by that fraction) keeps its closed-form factors, so the
refinement never makes a block worse on held-out windows.
It runs as a :func:`~rankcut.compression.blockpass.rework_blocks` pass, so memory holds one
block and one batch, in memory and streamed alike. Under torchrun it is data parallel: each
step trains on one batch of every process, their gradients averaged.
"""

from __future__ import annotations

import contextlib
import logging
import math
from copy import deepcopy
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import distributed
from ..core.hybrid import fake_quantized
from ..errors import ConfigError
from ..methods import setting
from ..nn.modules import LowRankLinear
from .blockpass import rework_blocks
from .engine import BlockRun
from .workfolder import load_tensors

logger = logging.getLogger(__name__)


#: The errors block refinement can tune on (``BlockRefineConfig.weight``).
WEIGHTS = ("mse", "token", "normed", "kl")
#: How the learning rate applies to each tensor (``BlockRefineConfig.lr_scale``).
LR_SCALES = ("absolute", "rms")
#: The training forward's precision (``BlockRefineConfig.precision``).
PRECISIONS = ("auto", "float32", "bf16")


@dataclass(frozen=True)
class BlockRefineConfig:
    """Block-wise refinement of the factors after truncation.

    Attributes:
        epochs: passes over the training batches per block.
        lr: AdamW's peak learning rate (10% linear warm-up, cosine decay to a tenth).
        batch_size: calibration samples per optimizer step.
        held_out: calibration samples held out to pick the best epoch (the last ones).
        norms: also tune the block's norm weights.
        weight_decay: AdamW's weight decay.
        seed: seed of the training batch order.
        weight: ``"mse"``, the mean squared error of the block's output; ``"token"``,
            each token's squared error relative to its target's mean square (so the
            attention-sink token's massive activation does not outweigh the others);
            ``"normed"``,
            that error after the norm that reads the block's output (the next block's
            input norm; the final norm after the last block), so that neither a few
            massive channels nor the attention-sink token dominate it; ``"kl"``, the
            error weighted by IO-SVD's output metric at the block's output (io-svd only).
        int8: the int8 rows of a remap: ``"requantize"`` trains them with the rest and
            quantizes them again; ``"frozen"`` keeps them as they are (no gradient).
        lr_scale: ``"absolute"``, every tensor steps with ``lr``; ``"rms"``, each tensor
            with ``lr`` times its own root mean square at the start of the block, so that
            the step is the same fraction of every factor (AdamW's step is about ``lr`` per
            entry whatever the entry's size, and the whitened factors' sizes differ by an
            order of magnitude between layers, and by 2–5× between models).
        precision: the training forward: ``"auto"`` runs it under bf16 autocast on a CUDA
            device that supports bf16 (float32 master factors, float32 loss) and in
            float32 elsewhere; ``"float32"`` always in float32; ``"bf16"`` under bf16
            autocast on any device, the CPU included (about 1.5× faster training steps on
            a CPU with AVX512-BF16 or AMX, emulated and slower without). The held-out
            error that picks the best epoch is always measured without autocast.
        min_gain: the least relative held-out gain an epoch must show over the
            closed-form block to be kept (0 keeps any gain; 0.01, at least 1%): a block
            whose best epoch gains less keeps its closed-form factors, so gains within
            the noise of a few held-out windows are not taken for real ones.
    """

    name: ClassVar[str] = "block"
    whole_model: ClassVar[bool] = False
    epochs: int = setting(5, "epochs of block refinement (passes over the training batches)")
    lr: float = setting(1e-2, "peak AdamW learning rate of block refinement (times each "
                              "tensor's root mean square with lr_scale rms)")
    batch_size: int = setting(4, "calibration samples per block refinement step")
    held_out: int = setting(8, "calibration samples held out to choose the best epoch")
    norms: bool = setting(False, "also tune the block's norm weights")
    weight_decay: float = setting(0.0, "AdamW weight decay of block refinement")
    seed: int = setting(0, "seed of the block refinement's batch order")
    weight: str = setting("mse", "block refinement error: plain mean squared error, each "
                                 "token's error relative to its target's mean square "
                                 "(token), the error after the norm that reads the "
                                 "block's output "
                                 "(normed), or weighted by IO-SVD's KL output metric "
                                 "(io-svd)", WEIGHTS)
    int8: str = setting("requantize", "int8 rows of a remap during block refinement: trained "
                                      "and quantized again, or kept frozen",
                        ("requantize", "frozen"))
    lr_scale: str = setting("rms", "block refinement's learning rate per tensor: the same "
                                   "for all (absolute) or times each tensor's root mean "
                                   "square (rms)", LR_SCALES)
    precision: str = setting("auto", "block refinement's training forward: bf16 autocast on "
                                     "CUDA (auto), float32 everywhere, or bf16 autocast on any "
                                     "device (bf16)", PRECISIONS)
    min_gain: float = setting(0.0, "least relative held-out gain over the closed-form block "
                                   "for block refinement to keep an epoch (0.01: one percent)")

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "held_out"):
            if getattr(self, key) < 1:
                raise ConfigError(f"block {key} must be at least 1; got {getattr(self, key)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"block lr must be a positive number; got {self.lr!r}")
        if not 0.0 <= self.weight_decay < 1.0:
            raise ConfigError(f"block weight_decay must be in [0, 1); got {self.weight_decay!r}")
        if self.weight not in WEIGHTS:
            raise ConfigError(f"block weight must be one of {', '.join(WEIGHTS)}; "
                              f"got {self.weight!r}")
        if self.int8 not in ("requantize", "frozen"):
            raise ConfigError(f"block int8 must be 'requantize' or 'frozen'; got {self.int8!r}")
        if self.lr_scale not in LR_SCALES:
            raise ConfigError(f"block lr_scale must be one of {', '.join(LR_SCALES)}; "
                              f"got {self.lr_scale!r}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ConfigError(f"block min_gain must be in [0, 1); got {self.min_gain!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"block precision must be one of {', '.join(PRECISIONS)}; "
                              f"got {self.precision!r}")

    @property
    def needs_output_metric(self) -> bool:
        """Whether the error is weighted by IO-SVD's output metric (``weight="kl"``)."""
        return self.weight == "kl"

    def settings(self) -> dict[str, Any]:
        """Returns the stage name and settings as a JSON-ready dict."""
        return {"name": self.name, **asdict(self)}


def refine_blocks(run: BlockRun, config: BlockRefineConfig, calibration) -> list[dict]:
    """Refines every compressed decoder block of ``run`` in forward order (see the module
    docstring). Side effects: the refined blocks replace the compressed ones; every block
    is committed (a rerun resumes).

    Returns:
        One {block, error_before, error_after, best_epoch, curve} entry per block: the
        held-out mean squared error of the closed-form block, of the kept one, and after
        every epoch.

    Raises:
        ConfigError: fewer calibration samples than ``held_out`` plus one batch.
    """
    samples = calibration.shape[0]
    if samples < config.held_out + config.batch_size:
        raise ConfigError(f"block refinement holds out {config.held_out} of {samples} "
                          f"calibration samples and needs at least one batch of "
                          f"{config.batch_size} more; raise --num-samples or lower "
                          "--block-held-out / --block-batch-size")

    if config.precision == "bf16" and torch.device(run.sm.device).type == "cpu" \
            and not cpu_has_bf16():
        logger.warning("block precision bf16: this CPU has no bf16 instructions (AVX512-BF16 "
                       "or AMX), so bf16 is emulated and slower than float32")

    def refine(again: BlockRun, block: nn.Module, index: int, names: list[str]) -> dict:
        return refine_block(again, block, index, names, config)

    return rework_blocks(run, "refine", calibration, config.batch_size, True, None, refine)


def refine_block(run: BlockRun, block: nn.Module, index: int, names: list[str],
                 config: BlockRefineConfig) -> dict:
    """Tunes block ``index`` (its low-rank layers ``names`` of ``run.sm.model``) on the
    compressed stream against the original block's outputs (work files acts-original);
    keeps the best held-out epoch. Returns the block's log entry (a block with nothing to
    tune, every layer kept dense by the allocation and ``norms`` off, is only scored)."""
    model = run.sm.model
    train, test, steps = _split_batches(len(run.batches), config)
    if not names and not config.norms:
        error = _held_out_error(run, block, index, test, _error_of(run, index, config.weight))
        return _block_entry(index, [error], error, "has no low-rank layer to refine")
    pairs = {name: TrainablePair.of(model.get_submodule(name), config.int8 == "frozen")
             for name in names}
    originals = {name: model.get_submodule(name) for name in names}
    for name, pair in pairs.items():
        model.set_submodule(name, pair)
    params = [p for pair in pairs.values() for p in pair.parameters()]
    if config.norms:
        params += [m.weight for m in block.modules() if _is_norm(m)]
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    error = _error_of(run, index, config.weight)
    try:
        curve = [_held_out_error(run, block, index, test, error)]
        best, kept = curve[0], _snapshot(params)
        bar = (1.0 - config.min_gain) * curve[0]
        optimizer = torch.optim.AdamW(_param_groups(params, config), lr=config.lr,
                                      weight_decay=config.weight_decay)
        schedule = _warmup_cosine(optimizer, config.epochs * steps)
        order = torch.Generator().manual_seed(config.seed * 100_003 + index)
        for _ in range(config.epochs):
            for position in torch.randperm(steps, generator=order).tolist():
                finite = True
                if position < len(train):  # a process with fewer batches sits out a step
                    b = train[position]
                    with training_precision(run.sm.device, config.precision):
                        output = run.run(block, index, b)
                    loss = error(output.float(), _target(run, index, b))
                    finite = bool(torch.isfinite(loss))
                    if finite:
                        loss.backward()
                if distributed.sum_numbers(int(not finite))[0]:  # every process stops
                    raise ConfigError(f"block {index} refinement: the loss became non-finite; "
                                      "lower --block-lr")
                _average_over_processes(params, position < len(train))
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
            curve.append(_held_out_error(run, block, index, test, error))
            if curve[-1] < best and curve[-1] <= bar:
                best, kept = curve[-1], _snapshot(params)
        _restore(params, kept)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for name, pair in pairs.items():
            model.set_submodule(name, pair.to_low_rank(originals[name]))
    return _block_entry(index, curve, best, f"refined over {config.epochs} epochs")


def _block_entry(index: int, curve: list[float], best: float, what: str) -> dict:
    """Logs block ``index``'s held-out errors (closed form → kept) and returns its log
    entry: {block, error_before, error_after, best_epoch, curve}."""
    epoch = curve.index(best)
    logger.info("block %d %s: held-out error %.4g -> %.4g (kept epoch %d)", index, what,
                curve[0], best, epoch)
    return {"block": index, "error_before": curve[0], "error_after": best,
            "best_epoch": epoch, "curve": curve}


class TrainablePair(nn.Module):
    """A low-rank layer's factors as two float32 parameters for training (input and output
    in the layer's dtype); :meth:`to_low_rank` rebuilds the layer, int8 rows quantized
    again from the trained factors.

    With a remap's int8 vectors to quantize again (``quantized``: (u mask, v mask) over the
    components), the forward uses those vectors after an int8 round trip and passes the
    gradient straight through to the float32 values, so the training loss and the held-out
    error that picks the epoch are those of the layer :meth:`to_low_rank` will build."""

    def __init__(self, w_u: torch.Tensor, w_v: torch.Tensor, bias: torch.Tensor | None,
                 quantized: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.weight_u = nn.Parameter(w_u.detach().float().clone())
        self.weight_v = nn.Parameter(w_v.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.quantized = quantized

    @classmethod
    def of(cls, layer: LowRankLinear, freeze_int8: bool = False) -> TrainablePair:
        """The pair of ``layer``'s (dequantized) factors; its int8 vectors are quantized
        again in the forward (straight through), or with ``freeze_int8`` their gradients
        are zero, so they stay as they are."""
        w_u, w_v = layer.factors()
        plan = layer.plan
        if plan is None:
            return cls(w_u, w_v, layer.bias)
        u_mask, v_mask = plan.u_int8.to(w_u.device), plan.v_int8.to(w_v.device)
        if not freeze_int8:
            return cls(w_u, w_v, layer.bias, quantized=(u_mask, v_mask))
        pair = cls(w_u, w_v, layer.bias)
        pair.weight_u.register_hook(lambda g: g.masked_fill(u_mask[None, :], 0))  # columns
        pair.weight_v.register_hook(lambda g: g.masked_fill(v_mask[:, None], 0))  # rows
        return pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_u, w_v = self.weight_u, self.weight_v
        if self.quantized is not None:
            u_mask, v_mask = self.quantized
            w_u = _int8_straight_through(w_u.T, u_mask).T  # u vectors: columns of W_u
            w_v = _int8_straight_through(w_v, v_mask)
        return F.linear(F.linear(x.float(), w_v), w_u, self.bias).to(x.dtype)

    def to_low_rank(self, layer: LowRankLinear) -> LowRankLinear:
        """The ``LowRankLinear`` of these factors, with ``layer``'s dtype, device and int8
        layout."""
        bias = None if self.bias is None else self.bias.detach().to(layer.weight_u.dtype)
        rebuilt = LowRankLinear.from_factors(self.weight_u.detach(), self.weight_v.detach(),
                                             bias, dtype=layer.weight_u.dtype, plan=layer.plan)
        return rebuilt.to(layer.weight_u.device)


def _int8_straight_through(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``rows`` with the rows in ``mask`` replaced by their int8 round trip (as
    ``LowRankLinear.from_factors`` stores them) in the forward; the gradient reaches every
    row unchanged (straight-through estimator)."""
    if not bool(mask.any()):
        return rows
    chosen = rows.detach()[mask]
    delta = torch.zeros_like(rows)
    delta[mask] = fake_quantized(chosen) - chosen
    return rows + delta


def _split_batches(batches: int, config: BlockRefineConfig
                   ) -> tuple[list[int], list[int], int]:
    """This process's training and held-out batches (local numbers) and the optimizer steps
    per epoch. The held-out slice is the last ``held_out`` samples' batches of the whole
    calibration; under torchrun each process holds global batches rank, rank + W, ...
    (``distributed.my_batches``) and a step trains on one batch of every process (data
    parallel, so W batches per step), for as many steps as the process with the most."""
    rank, size = distributed.world()
    total = distributed.sum_numbers(batches)[0]
    held = max(1, math.ceil(config.held_out / config.batch_size))
    first_held = total - held
    train = [j for j in range(batches) if rank + j * size < first_held]
    test = [j for j in range(batches) if rank + j * size >= first_held]
    return train, test, math.ceil(first_held / size)


def _average_over_processes(params: list[nn.Parameter], stepped: bool) -> None:
    """Replaces every gradient by its mean over the processes that trained on a batch this
    step (``stepped``), in place; no-op in one process."""
    if distributed.world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not stepped:
        for g in grads:
            g.zero_()
    distributed.sum_tensors(grads)
    processes = distributed.sum_numbers(int(stepped))[0]
    for p, g in zip(params, grads, strict=True):
        p.grad = g / processes


def training_precision(device: torch.device | str, precision: str
                       ) -> contextlib.AbstractContextManager:
    """The context of a training forward: bf16 autocast on ``device`` when ``precision`` is
    ``"bf16"``, or on a CUDA ``device`` that supports bf16 when it is ``"auto"``; otherwise
    no change (float32)."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (torch's AVX512-BF16 or AMX probe)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def _target(run: BlockRun, index: int, b: int) -> torch.Tensor:
    """The original block's output on the original stream for batch ``b``."""
    return load_tensors(run.work.file("acts-original", index + 1, b), run.sm.device)["h"].float()


def _error_of(run: BlockRun, index: int, weight: str):
    """The error ``(output, target) -> mean per element`` that block ``index`` is tuned on:
    the mean squared error; with ``weight="token"`` each token's relative to its target's
    mean square (:func:`token_relative_error`); with ``weight="normed"`` that error after
    the norm that reads the block's output (:func:`reading_norm`); with ``weight="kl"``
    the squared error in the metric G = IO-SVD's output metric at the block's output (work
    file metric/<index>), scaled to a mean diagonal of one and damped by 1% of the
    identity: mean of ‖(y − t) L‖² / d with G = L Lᵀ."""
    if weight == "mse":
        return F.mse_loss
    if weight == "token":
        return token_relative_error
    if weight == "normed":
        norm = reading_norm(run, index)

        def normed(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                reference = norm(target).float()
            return F.mse_loss(norm(output).float(), reference)

        return normed
    g = load_tensors(run.work.file("metric", index), run.sm.device)["g"].double()
    d = g.shape[0]
    g = g / g.diagonal().mean().clamp_min(1e-300) + 1e-2 * torch.eye(d, dtype=g.dtype,
                                                                     device=g.device)
    factor = torch.linalg.cholesky(g).float()

    def weighted(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((output - target) @ factor).pow(2).mean()

    return weighted


def token_relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of each token's squared error relative to its target's mean
    square, mean_t(‖y_t − t_t‖² / ‖t_t‖²): every token weighs the same whatever its norm (a
    target of zero norm is floored at 1e-6 of the mean). ``output`` and ``target``: [..., d]."""
    square = target.pow(2).mean(dim=-1)
    square = square.clamp_min(1e-6 * float(square.mean()) + 1e-30)
    return ((output - target).pow(2).mean(dim=-1) / square).mean()


def reading_norm(run: BlockRun, index: int) -> nn.Module:
    """A frozen copy of the norm that reads block ``index``'s output: the first norm among
    the next block's direct children (its input norm), or after the last block the final
    norm beside the block list. Loads it for the copy when streamed.

    Raises:
        ConfigError: the model has no such norm (``--block-weight normed`` cannot apply).
    """
    sm = run.sm
    last = index + 1 == len(sm.blocks)
    owner = sm.model.get_submodule(sm.prefix.rpartition(".")[0]) if last else sm.blocks[index + 1]
    norm = next((m for m in owner.children() if _is_norm(m)), None)
    if norm is None:
        raise ConfigError(f"block weight 'normed': no norm reads the output of block {index} "
                          f"(none among the direct children of {type(owner).__name__}); "
                          "use --block-weight mse")
    loaded = norm.weight.device.type != "meta"
    with contextlib.nullcontext() if loaded else sm.parts([norm]):
        copy = deepcopy(norm)
    return copy.to(sm.device).requires_grad_(False)


def _held_out_error(run: BlockRun, block: nn.Module, index: int, batches: list[int],
                    error) -> float:
    """``error`` of the block's outputs on the held-out batches, per element (no
    gradients)."""
    total, elements = 0.0, 0
    with torch.no_grad():
        for b in batches:
            target = _target(run, index, b)
            total += error(run.run(block, index, b).float(), target).item() * target.numel()
            elements += target.numel()
    total, elements = distributed.sum_numbers(total, elements)
    return total / elements


def _is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer with a weight (RMSNorm, LayerNorm)."""
    return "norm" in type(module).__name__.lower() and isinstance(
        getattr(module, "weight", None), nn.Parameter)


def _param_groups(params: list[nn.Parameter], config: BlockRefineConfig) -> list[dict]:
    """AdamW's parameter groups: one with ``config.lr`` (``lr_scale="absolute"``), or one
    per tensor with ``config.lr`` times the tensor's root mean square (``"rms"``; an
    all-zero tensor, e.g. a bias, takes the mean of the others' so it can still move)."""
    if config.lr_scale == "absolute":
        return [{"params": params}]
    rms = [float(p.detach().double().square().mean().sqrt()) for p in params]
    nonzero = [r for r in rms if r > 0.0] or [1.0]
    fallback = sum(nonzero) / len(nonzero)
    return [{"params": [p], "lr": config.lr * (r if r > 0.0 else fallback)}
            for p, r in zip(params, rms, strict=True)]


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            p.copy_(value)


def _warmup_cosine(optimizer: torch.optim.Optimizer, steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """10% linear warm-up, then a cosine decay to a tenth of the peak (AA-SVD's schedule)."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
