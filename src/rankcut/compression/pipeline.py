"""In-memory compression (``compress``) and ``to_dense``.

``compress`` runs the block-wise engine (``compression.engine``) over the model held in memory
(``engine.ResidentModel``), its activations in a temporary work folder, then the optional
parameter update (``rankcut.compression.update``).

Under ``torch.distributed`` (``rankcut.calibration.distributed``) every rank runs its share of the
calibration batches, the statistics are summed over ranks, each module is decomposed by
the rank that owns it (module i by rank i mod W) and its factors are broadcast, so every
rank ends with the same compressed model.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..architecture import select_targets
from ..calibration import distributed
from ..calibration.data import Calibration, as_calibration
from ..core.allocation import uniform_ranks
from ..methods import MethodConfig
from ..nn.modules import LowRankLinear
from .blockpass import anchor_blocks
from .correction import correct
from .engine import (
    BlockRun,
    CompressionReport,
    Executor,
    ModuleResult,
    ResidentModel,
    check_inputs,
)
from .update import UpdateConfig, apply_update, keeps_blocks, lora_teacher, needs_block_metric
from .workfolder import WorkFolder, scratch_folder

logger = logging.getLogger(__name__)


def compress(
    model: nn.Module,
    config: MethodConfig,
    calibration: torch.Tensor | Calibration | None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    batch_size: int = 8,
    rank_map: dict[str, int | None] | None = None,
    update: UpdateConfig | None = None,
) -> CompressionReport:
    """Compresses ``model`` in place with the method ``config`` names.

    Side effects: replaces factorized ``nn.Linear`` modules by ``LowRankLinear`` and sets
    ``model.config.quantization_config`` to the rankcut entry (rank map included).

    With ``torch.distributed`` initialized this is a collective: every rank passes the same
    model and calibration ids, runs its share of the batches and of the factorizations, and
    ends with the same compressed model (equal to one process's up to rounding).

    Args:
        model: a causal LM (transformers ``PreTrainedModel``) in eval mode.
        config: the method and its settings.
        calibration: [num_samples, seqlen] token ids, or a ``Calibration`` with image-text
            samples (a vision-language model sees them whole; its language tower's statistics
            cover the image tokens); may be None for methods that need no statistics.
        include: glob patterns of modules to compress (default: all decoder-block linears).
        exclude: glob patterns of modules to leave alone.
        batch_size: calibration samples per forward pass.
        rank_map: {module: rank or None (dense)} to use instead of the method's allocation,
            e.g. one written by an earlier run.
        update: a parameter update to run after truncation (``compression.update``: closed-form
            refit or sequential LoRA), or None.

    Returns:
        The report (ranks, losses, achieved ratio, seconds).

    Raises:
        CalibrationError: statistics are needed but no calibration ids were given, or the
            activations became non-finite.
        ConfigError: the rank map does not match the target modules, a parameter update is
            asked for in a distributed run, or there are fewer calibration batches than
            processes.
        UnsupportedModelError: the model has no decoder blocks of nn.Linear layers.
    """
    targets = select_targets(model, include, exclude)
    calibration = None if calibration is None else as_calibration(calibration)
    check_inputs(model, config, targets, calibration, rank_map, update)
    report = CompressionReport(method=config.name, settings=config.settings())
    start = time.perf_counter()
    with scratch_folder("rankcut-work-") as folder:
        work = WorkFolder(folder / "run", "resident")
        teacher = lora_teacher(model, update, calibration)
        run = compress_blocks(ResidentModel(model), work, report, config, targets, calibration,
                              batch_size, rank_map, refit=keeps_blocks(update),
                              block_metric=needs_block_metric(update))
        if update is not None:
            report.update = apply_update(run, update, calibration, batch_size, teacher)
    report.seconds = time.perf_counter() - start
    model.config.quantization_config = report.quantization_config()
    return report


def to_dense(model: nn.Module) -> nn.Module:
    """Replaces every ``LowRankLinear`` by an equivalent ``nn.Linear``, in place.

    Side effects: removes ``quantization_config`` from ``model.config`` and turns the
    latent value cache off.

    Returns:
        The same model, now dense.
    """
    from ..nn.valuecache import disable_latent_values

    disable_latent_values(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            model.set_submodule(name, module.to_dense())
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    return model


def compress_blocks(sm: Executor, work: WorkFolder, report: CompressionReport,
                    config: MethodConfig, targets: dict[str, nn.Linear],
                    calibration: Calibration | None, batch_size: int,
                    rank_map: dict[str, int | None] | None,
                    refit: bool = False, block_metric: bool = False) -> BlockRun:
    """Compresses ``targets`` with ``config``'s strategy, block by block over ``sm``, then
    runs its correction stages (``rankcut.compression.correction``) when it has them, or
    the anchored re-cut (``blockpass.anchor_blocks``) with ``objective="anchored"``.

    Side effects: swaps the factorized layers into ``sm.model`` (and has the executor keep
    each compressed block: a shard in ``work`` when streamed); frees the replaced layers'
    weights; commits every step to ``work`` (a rerun resumes); sets ``report.modules``
    (every target's result, in block order) and ``report.stage_losses``.

    Args:
        sm: the executor.
        work: the run's work folder.
        config: the method and its settings.
        targets: {name: nn.Linear} inside the decoder blocks.
        calibration: the calibration samples, token ids or image-text (None for methods
            without statistics).
        batch_size: samples per forward pass of the input statistics.
        rank_map: {module: rank or None} to use instead of the method's allocation.
        refit: a block-wise update follows (``update.keeps_blocks``): every process keeps
            its blocks and the original weights in ``work``.
        block_metric: also write each block's output metric (``BlockRun.block_metric``;
            methods with the IO-SVD output metric).

    Returns:
        The block run, for the steps that follow on the compressed blocks.
    """
    batches, grad_batches = _calibration_batches(config, calibration, batch_size)
    run = BlockRun(sm, work, config, targets, batches, grad_batches)
    anchored = getattr(config, "anchored", False)
    run.reworked = refit or anchored
    run.anchored_metric = anchored and config.needs_output_stats
    run.block_metric = block_metric
    if config.needs_output_stats and calibration is not None:
        grad_samples = getattr(config, "grad_samples", None) or calibration.shape[0]
        run.idle_steps = distributed.idle_steps(
            len(calibration[:grad_samples].split(config.grad_batch_size)))
    mode = _mode(config, rank_map)
    run.recover(mode)
    sm.restore_outside(work, work.progress.get("results", []))
    if mode == "backward":
        run.store_by_backward(scoring=rank_map is None and config.allocation == "global")
    elif mode == "forward":
        run.store_by_forward()
    if mode == "uniform":
        shapes = {name: tuple(layer.weight.shape) for name, layer in targets.items()}
        ranks, plans = rank_map or uniform_ranks(shapes, config.ratio), {}
    else:
        ranks, plans = run.select(rank_map)
    run.write_blocks(ranks, plans, stored=mode != "uniform")
    if run.durable:
        run.use_written_layouts()
    if any(ranks[name] is not None for name in run.post):
        _untie_head(sm.model)
    if run.correcting:
        report.stage_losses = correct(run, ranks, plans)
    if anchored:
        report.anchor_log = anchor_blocks(run, calibration, batch_size)
    report.modules = [ModuleResult(**{**r, "shape": tuple(r["shape"])})
                      for r in work.progress["results"]]
    return run


def _untie_head(model: nn.Module) -> None:
    """Records in ``model``'s config that its factorized LM head no longer shares the
    input embeddings (a loader would otherwise tie them again)."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def _mode(config: MethodConfig, rank_map: dict | None) -> str:
    """How a block-wise run proceeds: ``"backward"`` (forward pass, head, block-wise
    backward storing every factor, then allocation), ``"forward"`` (factors stored block
    by block, then allocation) or ``"uniform"`` (ranks known: blocks written directly)."""
    if config.needs_row_fisher or (config.allocation == "global"
                                   and (rank_map is None or config.needs_output_stats)):
        return "backward"
    if config.allocation == "truncation-loss" and rank_map is None:
        return "forward"
    return "uniform"


def _calibration_batches(config: MethodConfig, calibration: Calibration | None,
                         batch_size: int) -> tuple[list[torch.Tensor], int]:
    """The calibration batches and how many of them (the first) enter the gradients.

    Global methods batch as the whole-model gradient pass does: the first
    ``grad_samples`` samples in batches of ``grad_batch_size``, then the rest (input
    statistics only) in batches of the same size.
    """
    if calibration is None or calibration.numel() == 0:
        return [], 0
    if config.allocation != "global" and not config.needs_row_fisher:
        return distributed.my_batches(calibration, batch_size), 0
    grad_samples = getattr(config, "grad_samples", None) or calibration.shape[0]
    size = config.grad_batch_size
    grad = distributed.my_batches(calibration[:grad_samples], size)
    rank, processes = distributed.world()
    rest = calibration[grad_samples:] if config.needs_input_stats else calibration[:0]
    rest = list(rest.split(size))[rank::processes] if len(rest) else []
    return grad + rest, len(grad)
