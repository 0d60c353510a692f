"""In-memory compression (``compress``) and ``to_dense``.

``compress`` runs the block-wise engine (``rankcut.engine``) over the model held in memory
(``engine.ResidentModel``). What the engine cannot do yet (``engine.beyond_blocks``:
correction stages, targets outside the decoder blocks) takes the whole-model path kept
here: one gradient pass through the whole model holding every statistic at once, the
decompositions, the global selection and the correction stages.

Under ``torch.distributed`` (``rankcut.distributed``) every rank runs its share of the
calibration batches, the statistics are summed over ranks, each module is decomposed by
the rank that owns it (module i by rank i mod W) and its factors are broadcast, so every
rank ends with the same compressed model.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, linalg
from .allocation import (
    Selection,
    global_select,
    kept_params,
    loss_balanced_ranks,
    uniform_ranks,
)
from .blocks import accumulate_block_stats, capture_block_inputs, kwarg_sources, run_block
from .data import Calibration, as_calibration
from .engine import (
    CompressionReport,
    ModuleResult,
    ResidentModel,
    beyond_blocks,
    check_inputs,
    compress_blocks,
    factorize,
)
from .errors import CalibrationError
from .gradients import calibration_gradients, calibration_loss
from .hooks import InputMomentHooks, OutputMetricHooks
from .hybrid import (
    RowPlan,
    classic_cost,
    classic_plan,
    loss_aware_plans,
    row_loss_changes,
)
from .methods import MethodConfig, method_spec
from .models import block_index, find_decoder_blocks, select_targets
from .modules import LowRankLinear
from .update import UpdateConfig, apply_update
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
    # what the engine cannot do yet takes the whole-model path (one backward pass
    # through the whole model, every statistic held at once)
    if beyond_blocks(targets, find_decoder_blocks(model)[0]):
        _compress_whole_model(model, config, targets, calibration, batch_size, report, rank_map)
    else:
        with tempfile.TemporaryDirectory(prefix="rankcut-work-") as folder:
            work = WorkFolder(Path(folder) / "run", "resident")
            compress_blocks(ResidentModel(model), work, report, config, targets, calibration,
                            batch_size, rank_map, keep_originals=update is not None)
    if update is not None:
        report.update = apply_update(model, update, targets, calibration, batch_size)
    report.seconds = time.perf_counter() - start
    model.config.quantization_config = report.quantization_config()
    return report


def _compress_whole_model(model, config, targets, calibration, batch_size,
                          report: CompressionReport, rank_map) -> None:
    """The whole-model path, for what ``engine.beyond_blocks`` names."""
    if config.allocation == "global" and (rank_map is None or config.needs_output_stats):
        _compress_globally(model, config, targets, calibration, batch_size, report, rank_map)
    elif config.allocation == "truncation-loss" and rank_map is None:
        _compress_by_truncation_loss(model, config, targets, calibration, batch_size, report)
    else:
        shapes = {name: tuple(layer.weight.shape) for name, layer in targets.items()}
        ranks = rank_map if rank_map is not None else uniform_ranks(shapes, config.ratio)
        fisher = _row_fisher(model, config, targets, calibration) if config.needs_row_fisher else {}
        _compress_block_by_block(model, config, targets, calibration, batch_size, ranks, report,
                                 fisher)


def _compress_block_by_block(model, config, targets, calibration, batch_size, ranks,
                             report: CompressionReport, outputs: dict | None = None) -> None:
    spec = method_spec(config.name)
    outputs = outputs or {}
    owned = set(distributed.mine(list(targets)))

    def decomposer(stats):
        return lambda name: (spec.decompose(config, targets[name].weight, stats.get(name),
                                            outputs.get(name)) if name in owned else None)

    with torch.no_grad():
        for names, stats in _block_groups(model, config, targets, calibration, batch_size):
            layers = {name: targets[name] for name in names}
            report.modules.extend(factorize(model, layers, ranks, decomposer(stats)).values())


def _row_fisher(model, config, targets, calibration) -> dict[str, torch.Tensor]:
    """FWSVD's statistics: per output row, Σ over gradient batches of Σ_j (∂L_b/∂W_ij)²."""
    fisher = {name: torch.zeros(layer.out_features, dtype=torch.float64)
              for name, layer in targets.items()}
    calibration_gradients(model, targets, calibration[: config.grad_samples],
                          config.grad_batch_size, fisher_rows=fisher)
    return fisher


def _compress_by_truncation_loss(model, config, targets, calibration, batch_size,
                                 report: CompressionReport) -> None:
    """Decomposes every module (block by block), allocates ranks per module type from
    the truncation losses (SVD-LLM v2), then applies them."""
    spec = method_spec(config.name)
    owned = set(distributed.mine(list(targets)))
    decompositions, tokens = {}, 0
    with torch.no_grad():
        for names, stats in _block_groups(model, config, targets, calibration, batch_size):
            for name in names:
                if name in owned:
                    decompositions[name] = spec.decompose(config, targets[name].weight,
                                                          stats[name], None)
                tokens = stats[name].count
        shapes = {name: tuple(layer.weight.shape) for name, layer in targets.items()}
        sigmas = distributed.share({n: [d.sigma] for n, d in decompositions.items()},
                                   {n: [(min(shape),)] for n, shape in shapes.items()})
        ranks = loss_balanced_ranks(shapes, {n: v[0] for n, v in sigmas.items()}, config.ratio,
                                    tokens)
        results = factorize(model, targets, ranks, lambda name: decompositions.pop(name, None))
    report.modules.extend(results.values())


def _compress_globally(model, config, targets, calibration, batch_size,
                       report: CompressionReport, rank_map=None) -> None:
    """Gradients, every module's decomposition and scores, one global selection (or the
    given ``rank_map``), the optional int8 row plans, then the optional correction stages
    (zero-sum, io-svd)."""
    grad_ids = calibration[: config.grad_samples]
    remap = getattr(config, "remap", None)
    # with a given rank map only a loss-aware int8 remap still needs G and nothing the scores
    selecting = rank_map is None
    grads, decompositions, scores = _global_statistics(
        model, config, targets, calibration, grad_ids, batch_size, scoring=selecting,
        weight_grads=config.needs_loss_gradients and (selecting or remap == "loss-aware"))
    shapes = {name: tuple(layer.weight.shape) for name, layer in targets.items()}
    selection = (Selection(ranks=dict(rank_map)) if not selecting else
                 global_select(shapes, scores, config.ratio, config.rule, config.min_rank,
                               cost=classic_cost if remap else kept_params))
    plans = _row_plans(remap, shapes, selection.ranks, decompositions, grads, config.ratio)
    del grads
    originals = {n: targets[n].weight.detach().to(torch.float64, copy=True)
                 for n in decompositions
                 if selection.ranks[n] is not None} if config.stages > 1 else {}
    with torch.no_grad():
        results = factorize(model, targets, selection.ranks, decompositions.get, plans)
    report.stage_losses.extend(_run_correction_stages(
        model, originals, decompositions, selection.ranks, plans, grad_ids, config, results))
    report.modules.extend(results.values())


def _global_statistics(model, config, targets, calibration, grad_ids, batch_size,
                       scoring: bool = True, weight_grads: bool = True):
    """One gradient pass (which also gathers the input statistics when it covers all the
    calibration samples, and the KL output metric for io-svd), then every module's
    decomposition and (when ``scoring``) component scores.

    Args:
        weight_grads: compute the loss gradients G (False: forward-only statistics).

    Returns:
        ({module: G}, {module: Decomposition} of the modules this rank owns, {module:
        component scores} of every module).
    """
    spec = method_spec(config.name)
    shared = grad_ids.shape[0] == calibration.shape[0]
    outputs = (OutputMetricHooks(targets, config.top_k, config.kl_mode, config.seed)
               if config.needs_output_stats else None)
    with InputMomentHooks(targets if shared else {}) as hooks, outputs or contextlib.nullcontext():
        grads, loss = calibration_gradients(
            model, targets, grad_ids, config.grad_batch_size, checkpointing=config.checkpointing,
            input_hooks=hooks if shared else None, output_hooks=outputs,
            weight_grads=weight_grads)
    logger.info("calibration loss of the original model: %.4f", loss)
    owned = set(distributed.mine(list(targets)))
    decompositions, scores = {}, {}
    groups = ([(list(targets), hooks.stats)] if shared else
              _block_groups(model, config, targets, calibration, batch_size))
    with torch.no_grad():
        for names, stats in groups:
            mine = [name for name in names if name in owned]
            for name in tqdm(mine, desc="decompose", unit="module", disable=not shared):
                decompositions[name] = spec.decompose(config, targets[name].weight, stats[name],
                                                      outputs and outputs.stats[name])
                if scoring:
                    scores[name] = [spec.score(config, decompositions[name], grads.get(name))]
    if scoring:
        scores = distributed.share(scores, {n: [(min(t.weight.shape),)]
                                            for n, t in targets.items()})
    return grads, decompositions, {name: value[0] for name, value in scores.items()}


def _row_plans(remap, shapes, ranks, decompositions, grads, ratio) -> dict[str, RowPlan]:
    """The int8 rows of every factorized module under ``remap`` (empty without one)."""
    factored = [name for name in shapes if ranks[name] is not None]
    if remap == "classic":
        return {name: classic_plan(*shapes[name], ranks[name]) for name in factored}
    if remap == "loss-aware":
        changes = {name: list(row_loss_changes(decompositions[name], ranks[name], grads[name]))
                   for name in factored if name in decompositions}
        changes = distributed.share(changes, {name: [(ranks[name],)] * 2 for name in factored})
        changes = {name: tuple(value) for name, value in changes.items()}
        budget = (1.0 - ratio) * sum(2 * m * n for m, n in shapes.values())
        return loss_aware_plans(shapes, ranks, changes, budget)
    return {}


def _run_correction_stages(model, originals, decompositions, ranks, plans, grad_ids, config,
                           results: dict[str, ModuleResult]) -> list[float]:
    """Runs stages 2..N; stops early when a stage finds no step that lowers the loss.

    Side effects: replaces the factorized modules and their entries in ``results``.

    Returns:
        The calibration loss after each stage that was run (empty when ``stages`` is 1).
    """
    losses: list[float] = []
    for stage in range(2, config.stages + 1):
        corrected, before, after = _correction_stage(model, stage, originals, decompositions,
                                                     ranks, plans, grad_ids, config)
        if not losses:
            losses.append(before)
            logger.info("calibration loss after stage 1: %.4f", before)
        if corrected is None:
            logger.info("stage %d: no step scale lowers the calibration loss; keeping the "
                        "stage %d model and skipping the remaining stages", stage, stage - 1)
            break
        results.update(corrected)
        losses.append(after)
        logger.info("calibration loss after stage %d: %.4f", stage, after)
    return losses


#: Global scales tried, in order, on the projected-gradient step of a correction stage.
STEP_SCALES = (1.0, 0.5, 0.25)


def _correction_stage(model, stage, originals, decompositions, ranks, plans, grad_ids, config):
    """One truncate–correct–re-truncate stage with a backtracking safeguard.

    The step is W += α·(⟨g,ΔW⟩/⟨g,g⟩)·g per module, with ΔW the gap to the original weight
    and g the loss gradient at the truncated model; the corrected W is cut again at the
    same rank in the same whitened basis. α runs through ``STEP_SCALES`` and the first
    scale whose re-truncated model has a lower calibration loss is kept; when none does,
    the truncated modules are put back unchanged.

    ``originals`` holds the original weights of the factorized modules this rank owns
    (all of them in one process); the owner computes a module's step and re-truncation.

    Returns:
        (the re-truncated modules' results or None when the stage was rejected,
        the calibration loss before the stage, the loss after it).
    """
    factored = {name: model.get_submodule(name) for name, rank in ranks.items()
                if rank is not None}
    dense = {name: module.to_dense() for name, module in factored.items()}
    for name, layer in dense.items():
        model.set_submodule(name, layer)
    grads, before = calibration_gradients(model, dense, grad_ids, config.grad_batch_size,
                                          checkpointing=config.checkpointing)
    with torch.no_grad():
        for name in originals:  # grads[name] becomes the unscaled step
            layer = dense[name]
            gap = originals[name] - layer.weight.detach().to(torch.float64)
            g = grads[name].to(torch.float64)
            grads[name] = (g * ((g * gap).sum() / (g * g).sum().clamp_min(1e-300))).float()
    for scale in STEP_SCALES:
        results = _retruncate(model, dense, grads, scale, decompositions, ranks, plans)
        after = calibration_loss(model, grad_ids, config.grad_batch_size)
        logger.info("stage %d, step scale %.2f: calibration loss %.4f -> %.4f", stage, scale,
                    before, after)
        if after < before:
            return results, before, after
    for name, module in factored.items():
        model.set_submodule(name, module)
    return None, before, before


def _retruncate(model, dense, steps, scale, decompositions, ranks,
                plans) -> dict[str, ModuleResult]:
    """Replaces each module of ``dense`` by the rank-r cut of W + scale·step (same S, same
    int8 rows), cut by the rank that holds its decomposition."""

    def decompose(name: str) -> linalg.Decomposition | None:
        old = decompositions.get(name)
        if old is None:
            return None
        corrected = dense[name].weight.detach().to(torch.float64) + scale * steps[name].double()
        return linalg.decompose(corrected, old.input_whitening, old.output_whitening)

    with torch.no_grad():
        return factorize(model, dense, ranks, decompose, plans, log=False)


def _block_groups(model, config, targets, calibration, batch_size):
    """Yields (module names, their input statistics) one decoder block at a time.

    Each rank runs its share of the calibration batches; the statistics are summed over
    ranks before they are yielded.

    Without input statistics the groups come straight from the names. With them, the
    block's inputs are captured once and propagated block by block; when
    ``config.sequential`` the next block is fed the outputs of this block after the caller
    has compressed it (the generator resumes only once the caller is done).
    """
    prefix, blocks = find_decoder_blocks(model)
    by_block = _group_by_block(targets, prefix, len(blocks))
    outside = [n for n in targets if block_index(n, prefix) is None]
    if not config.needs_input_stats:
        for index in tqdm(sorted(by_block), desc=f"{config.name} blocks", unit="block"):
            yield by_block[index], {}
        if outside:
            yield outside, {}
        return
    if outside:
        yield outside, _whole_model_stats(model, {n: targets[n] for n in outside}, calibration,
                                          batch_size)
    inputs = capture_block_inputs(model, blocks, distributed.my_batches(calibration, batch_size))
    sources = kwarg_sources(model, len(blocks))
    for index in tqdm(range(len(blocks)), desc=f"{config.name} blocks", unit="block"):
        names = by_block.get(index, [])
        block, source = blocks[index], sources[index]
        stats, outputs = accumulate_block_stats(block, names, targets, inputs, source)
        distributed.sum_moments(stats)
        yield names, stats
        inputs = run_block(block, inputs, source) if config.sequential and names else outputs


def _whole_model_stats(model: nn.Module, layers: dict[str, nn.Linear],
                       calibration: Calibration, batch_size: int) -> dict:
    """Input statistics of target layers outside the decoder blocks (a VLM's projector or
    vision tower, the LM head) from whole-model forward passes over this rank's batches,
    summed over ranks. They run before the blocks are compressed, so the blocks then see
    the compressed projector's outputs; an LM head sees the original blocks' outputs.

    Raises:
        CalibrationError: no calibration sample reaches one of the layers (e.g. a vision
            layer without image samples), or its inputs are not finite.
    """
    parameter = next(model.parameters())
    with InputMomentHooks(layers) as hooks, torch.no_grad():
        for batch in distributed.my_batches(calibration, batch_size):
            hooks.new_batch()
            model(**batch.model_inputs(parameter.device, parameter.dtype), use_cache=False)
    distributed.sum_moments(hooks.stats)
    unseen = [name for name, stat in hooks.stats.items() if stat.count == 0]
    if unseen:
        raise CalibrationError(f"no calibration sample reaches {unseen[0]}: a vision-side "
                               "module needs image samples (--calib-images), and a module "
                               "the model never runs (e.g. an unused pooling head) must be "
                               "left out with --exclude")
    return hooks.stats


def _group_by_block(targets: dict[str, nn.Linear], prefix: str, count: int) -> dict[int, list]:
    grouped: dict[int, list[str]] = {}
    for name in targets:
        index = block_index(name, prefix)
        if index is not None and index < count:
            grouped.setdefault(index, []).append(name)
    return grouped



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
