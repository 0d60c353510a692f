"""In-memory compression (``compress``) and ``to_dense``.

``compress`` runs the block-wise engine (``rankcut.engine``) over the model held in memory
(``engine.ResidentModel``), its activations in a temporary work folder, then the optional
parameter update (``rankcut.update``).

Under ``torch.distributed`` (``rankcut.distributed``) every rank runs its share of the
calibration batches, the statistics are summed over ranks, each module is decomposed by
the rank that owns it (module i by rank i mod W) and its factors are broadcast, so every
rank ends with the same compressed model.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .data import Calibration, as_calibration
from .engine import (
    CompressionReport,
    ResidentModel,
    check_inputs,
    compress_blocks,
)
from .methods import MethodConfig
from .models import select_targets
from .modules import LowRankLinear
from .update import RefitConfig, UpdateConfig, apply_update
from .workfolder import WorkFolder

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
        update: a parameter update to run after truncation (``rankcut.update``: closed-form
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
    with tempfile.TemporaryDirectory(prefix="rankcut-work-") as folder:
        work = WorkFolder(Path(folder) / "run", "resident")
        run = compress_blocks(ResidentModel(model), work, report, config, targets, calibration,
                              batch_size, rank_map, refit=isinstance(update, RefitConfig))
        if update is not None:
            report.update = apply_update(run, update, calibration, batch_size)
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
    from .valuecache import disable_latent_values

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
