"""Correction stages (Zero-Sum SVD's stages 2..N), run block by block over an executor.

After truncation, each stage computes the calibration-loss gradient g at the truncated model
(a forward pass keeping each block's input, the head, a block-wise backward), takes per
module the projected step W += α·(⟨g,ΔW⟩/⟨g,g⟩)·g towards the original weight (ΔW the gap
to it), re-cuts the corrected W at the same rank in the same whitened basis (same int8
rows), and keeps the first α of ``STEP_SCALES`` whose re-truncated model has a lower
calibration loss (forward-only passes). When none does, the stages stop.

The current blocks live in the work folder (``blocks/``); a trial's blocks are written to
``candidates/<stage>/`` and moved over once the stage is accepted and committed, so a run
killed at any moment resumes: an accepted stage finishes its moves, an unfinished one
starts over.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import asdict

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import distributed
from ..core import linalg
from ..nn.modules import LowRankLinear
from .engine import (
    BlockRun,
    ModuleResult,
    factorize,
    load_outside,
    load_whitening,
    save_block,
    save_outside,
)
from .workfolder import load_tensors, save_tensors

logger = logging.getLogger(__name__)

#: Global scales tried, in order, on the projected-gradient step of a correction stage.
STEP_SCALES = (1.0, 0.5, 0.25)


def correct(run: BlockRun, ranks: dict, plans: dict) -> list[float]:
    """Runs stages 2..``config.stages`` on the blocks ``run`` wrote; stops early when a
    stage finds no step scale that lowers the calibration loss.

    Side effects: rewrites the blocks' work shards, commits every accepted stage (and the
    module results of its re-cut layers), and leaves the model holding the final blocks.

    Returns:
        The calibration loss after stage 1 and after each accepted stage.
    """
    work, config = run.work, run.config
    run.compressed, run.seeds, run.weight_grads = True, 0, True
    _keep_head_modules(run)
    _finish_accepted_moves(run)
    losses = list(work.progress.get("stage_losses", []))
    stage = max(2, work.done("stage") + 1)
    while stage <= config.stages and not work.done("stages_over"):
        before, result = _stage(run, stage, ranks, plans)
        if not losses:
            losses = [before]
            logger.info("calibration loss after stage 1: %.4f", before)
        if result is None:
            logger.info("stage %d: no step scale lowers the calibration loss; keeping the "
                        "stage %d model and skipping the remaining stages", stage, stage - 1)
            work.commit(stages_over=1, stage_losses=losses)
            break
        after, results = result
        losses.append(after)
        logger.info("calibration loss after stage %d: %.4f", stage, after)
        work.commit(stage=stage, stage_losses=losses, results=_updated(work, results))
        _finish_accepted_moves(run)
        stage += 1
    work.drop("steps")
    work.drop("acts")
    for index in range(len(run.sm.blocks)):  # the model holds the kept blocks
        run.sm.release(run.block(index))
    with run.sm.parts(run.sm.outside(skip_head=False)):  # and the kept head modules
        for name in _head_modules(run):
            load_outside(work, "outside", run.sm, name)
    return losses


def _head_modules(run: BlockRun) -> list[str]:
    """The factorized targets after the blocks (the LM head)."""
    return [name for name in run.post
            if isinstance(run.sm.model.get_submodule(name), LowRankLinear)]


def _keep_head_modules(run: BlockRun) -> None:
    """Writes the factorized head modules to outside/ when the executor has not (in
    memory): the stages read them from there and write their re-cuts beside them."""
    names = [name for name in _head_modules(run)
             if not run.work.file("outside", name).exists()]
    if names:
        with run.sm.parts(run.sm.outside(skip_head=False)):
            for name in names:
                save_outside(run.work, "outside", run.sm, name)


def _finish_accepted_moves(run: BlockRun) -> None:
    """Moves the committed stage's candidate blocks over the current ones (a run killed
    between the commit and the moves finishes them) and drops any other candidates."""
    work = run.work
    work.move_files(f"candidates/{work.done('stage')}/outside", "outside")
    work.move_files(f"candidates/{work.done('stage')}", "blocks")
    work.drop("candidates")


def _updated(work, results: dict[str, ModuleResult]) -> list[dict]:
    """The committed module results with those of ``results`` replaced."""
    return [asdict(results[r["name"]]) if r["name"] in results else r
            for r in work.progress["results"]]


def _stage(run: BlockRun, stage: int, ranks: dict, plans: dict
           ) -> tuple[float, tuple[float, dict[str, ModuleResult]] | None]:
    """One truncate–correct–re-truncate stage with a backtracking safeguard.

    Returns:
        (the loss before, then (the loss after, the re-cut modules' results) or None when
        no step scale lowers the loss).
    """
    before = _gradient_steps(run)
    for scale in STEP_SCALES:
        after, results = _trial(run, stage, scale, ranks, plans)
        logger.info("stage %d, step scale %.2f: calibration loss %.4f -> %.4f", stage, scale,
                    before, after)
        if after < before:
            return before, (after, results)
        run.work.drop("candidates")
    return before, None


def _factorized(run: BlockRun, index: int) -> dict[str, LowRankLinear]:
    return {name: run.sm.model.get_submodule(name) for name in run.by_block.get(index, [])
            if isinstance(run.sm.model.get_submodule(name), LowRankLinear)}


def _gradient_steps(run: BlockRun) -> float:
    """The loss gradient at the current (truncated) blocks, block-wise; writes each owned
    module's projected step to steps/<module>. Returns the calibration loss."""
    sm, work = run.sm, run.work
    run.kwargs(write_inputs=True)
    blocks = len(sm.blocks)
    for index in tqdm(range(blocks), desc="correction forward", unit="block"):
        block = run.block(index)
        run.forward(block, index, run.grad_batches)
        sm.release(block)
    dense: dict[str, nn.Linear] = {}
    before, grads = run.head_pass(True, functools.partial(_dense_head, run, dense))
    with torch.no_grad():
        for name in distributed.mine(list(grads)):
            save_tensors(work.file("steps", name),
                         {"step": _projected_step(work, name, dense[name], grads[name])})
    del dense
    for index in tqdm(range(blocks - 1, -1, -1), desc="correction backward", unit="block"):
        block = run.block(index)
        with _dense_copies(run, _factorized(run, index)) as dense:
            _, _, grads = run.backward_block(block, index, dense, input_stats=False)
        with torch.no_grad():
            for name in distributed.mine(run.by_block.get(index, [])):
                if name in dense:
                    save_tensors(work.file("steps", name),
                                 {"step": _projected_step(work, name, dense[name], grads[name])})
        work.drop("grads", index + 1)
        if index:
            work.drop("acts", index)
        sm.release(block)
    work.drop("grads", 0)
    return before


def _loaded_head_modules(run: BlockRun) -> dict[str, LowRankLinear]:
    """With the head loaded: its factorized modules, as kept in outside/."""
    for name in _head_modules(run):
        load_outside(run.work, "outside", run.sm, name)
    return {name: run.sm.model.get_submodule(name) for name in _head_modules(run)}


@contextlib.contextmanager
def _dense_copies(run: BlockRun, low_rank: dict[str, LowRankLinear]):
    """Swaps the factorized modules ``low_rank`` for dense copies in the model, yields the
    copies and puts the factorized modules back on exit (whatever replaced the copies
    meanwhile goes)."""
    dense = {name: module.to_dense() for name, module in low_rank.items()}
    for name, layer in dense.items():
        run.sm.model.set_submodule(name, layer)
    try:
        yield dense
    finally:
        for name, module in low_rank.items():
            run.sm.model.set_submodule(name, module)


@contextlib.contextmanager
def _dense_head(run: BlockRun, dense: dict[str, nn.Linear]):
    """With the head loaded: its factorized modules made dense (also put into ``dense``)
    for their gradients, put back on exit."""
    with _dense_copies(run, _loaded_head_modules(run)) as copies:
        dense.update(copies)
        yield copies


@contextlib.contextmanager
def _recut_head(run: BlockRun, stage: int, scale: float, ranks: dict, plans: dict,
                results: dict):
    """With the head loaded: re-cuts its factorized modules at W + scale·step (their
    results go into ``results``), writes them to candidates/<stage>/outside/ and yields
    (no gradients wanted); on exit puts the kept modules back."""
    work = run.work
    with _dense_copies(run, _loaded_head_modules(run)) as dense:
        decompose = functools.partial(_corrected, work, dense,
                                      set(distributed.mine(list(dense))), scale)
        with torch.no_grad():
            results.update(factorize(run.sm.model, dense, ranks, decompose, plans, log=False))
        for name in dense:
            save_outside(work, f"candidates/{stage}/outside", run.sm, name)
        yield {}


def _projected_step(work, name: str, dense: nn.Linear, grad: torch.Tensor) -> torch.Tensor:
    """(⟨g,ΔW⟩/⟨g,g⟩)·g with ΔW the gap from the truncated weight to the original."""
    original = load_tensors(work.file("originals", name))["w"].to(torch.float64)
    gap = original - dense.weight.detach().to(torch.float64)
    g = grad.to(torch.float64)
    return (g * ((g * gap).sum() / (g * g).sum().clamp_min(1e-300))).float()


def _trial(run: BlockRun, stage: int, scale: float, ranks: dict, plans: dict
           ) -> tuple[float, dict[str, ModuleResult]]:
    """Re-cuts every block at W + scale·step, runs the calibration batches through the
    re-cut blocks and writes them to candidates/<stage>/. Returns the loss and results."""
    sm, work = run.sm, run.work
    results: dict[str, ModuleResult] = {}
    for index in tqdm(range(len(sm.blocks)), desc=f"stage {stage} x{scale:g}", unit="block"):
        block = run.block(index)
        dense = {name: module.to_dense() for name, module in _factorized(run, index).items()}
        owned = set(distributed.mine(run.by_block.get(index, [])))
        decompose = functools.partial(_corrected, work, dense, owned, scale)
        with torch.no_grad():
            results.update(factorize(sm.model, dense, ranks, decompose, plans, log=False))
        run.forward(block, index, run.grad_batches)
        if index:
            work.drop("acts", index)
        save_block(work, f"candidates/{stage}", sm, index, ranks)
        sm.release(block)
    after, _ = run.head_pass(False, functools.partial(_recut_head, run, stage, scale, ranks,
                                                      plans, results))
    return after, results


def _corrected(work, dense: dict[str, nn.Linear], owned: set[str], scale: float, name: str
               ) -> linalg.Decomposition | None:
    """The decomposition of ``name``'s W + scale·step in its stage-1 whitened basis, when
    this process owns it (else None)."""
    if name not in owned:
        return None
    step = load_tensors(work.file("steps", name))["step"].to(torch.float64)
    corrected = dense[name].weight.detach().to(torch.float64) + scale * step
    return linalg.decompose(corrected, *load_whitening(work, name))
