"""Passes over the compressed decoder blocks in forward order, with both activation streams.

A pass (:func:`rework_blocks`) loads each compressed block in turn and, for each group of
its factorized layers that read one input (q/k/v, then o, then gate/up, then down), runs the
block on the compressed model's stream, as the layers before the group now have it, to
gather the group's input moments, paired with the same tokens' inputs on the original
model's stream when asked; then it changes the group's layers from those moments and the
original weights (kept in the work folder). The block's outputs become the next block's
inputs, so every layer sees the inputs the final model gives it. Two passes use it:

* the closed-form refit of W_u (``update.refit_blocks``);
* the anchored re-cut (:func:`anchor_blocks`): each layer is cut again at its rank by the
  closed form of min ‖W X − W′ X′‖ (``linalg.decompose(cross=...)``), X its original inputs
  and X′ those of the compressed model (AA-SVD's anchored objective).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import distributed
from ..calibration.blocks import run_block
from ..calibration.data import Calibration
from ..core import linalg
from ..nn.modules import LowRankLinear
from .engine import BlockRun, load_whitening, save_block
from .workfolder import load_tensors, save_tensors

logger = logging.getLogger(__name__)

#: The work folder kind where each pass writes its new blocks until they are committed.
_NEW_BLOCKS = {"refit": "refitted", "anchor": "anchored", "refine": "refined"}

#: (model, layer name, its original weight, its moments) -> log entry; swaps the layer.
LayerRework = Callable[[nn.Module, str, torch.Tensor, "PairedMoments"], dict]
#: (the pass's block run, the block, its index, its factorized layers) -> log entry.
BlockRework = Callable[[BlockRun, nn.Module, int, list[str]], dict]


@dataclass
class PairedMoments:
    """Second moments of a layer's compressed-model inputs x_c and, when the target is the
    original model's stream, of its original inputs x_o.

    Attributes:
        cc: Σ x_c x_cᵀ (n×n float64).
        oo, oc: Σ x_o x_oᵀ and Σ x_o x_cᵀ; None when the target is the compressed stream
            itself (x_o = x_c), where both equal ``cc``.
        count: tokens.
    """

    cc: torch.Tensor
    oo: torch.Tensor | None = None
    oc: torch.Tensor | None = None
    count: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu",
              paired: bool = True) -> PairedMoments:
        """Empty moments for inputs of dimension ``n`` (``paired=False``: x_o = x_c)."""
        def zero():
            return torch.zeros(n, n, dtype=torch.float64, device=device)
        return cls(zero(), zero(), zero()) if paired else cls(zero())

    def update(self, x_c: torch.Tensor, x_o: torch.Tensor | None = None) -> None:
        """Adds one batch of inputs (``x_o``: the same tokens in the original model, needed
        when paired). Mutates self."""
        c = x_c.reshape(-1, x_c.shape[-1]).to(self.cc.device, torch.float32)
        self.cc.add_(c.T @ c)
        if self.oo is not None:
            o = x_o.reshape(-1, x_o.shape[-1]).to(self.cc.device, torch.float32)
            self.oo.add_(o.T @ o)
            self.oc.add_(o.T @ c)
        self.count += c.shape[0]

    def target_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (Σ x_o x_oᵀ, Σ x_o x_cᵀ), which are Σ x_c x_cᵀ when unpaired."""
        return (self.cc, self.cc) if self.oo is None else (self.oo, self.oc)


def rework_blocks(run: BlockRun, step: str, calibration: Calibration, batch_size: int,
                  paired: bool, rework_layer: LayerRework | None,
                  rework_block: BlockRework | None = None) -> list[dict]:
    """Runs one pass over the compressed decoder blocks of ``run`` in forward order, calling
    ``rework_layer`` on every factorized layer with its moments (``paired``: with the
    original stream's), group by group (see the module docstring), or ``rework_block`` on
    each whole block (its original outputs are then the work files acts-original/<i+1>).

    Args:
        run: the compression's block run (it must have kept its blocks and the original
            weights: ``run.durable``).
        step: the pass's name (``"refit"``, ``"anchor"``): its progress counter, its log
            (``<step>_log``) and the work folder kind of its new blocks.
        calibration, batch_size: the calibration samples and samples per forward pass.
        paired: also run the original blocks on the original stream and pair each layer's
            inputs with their originals (the moments' ``oo`` and ``oc``).
        rework_layer: changes one layer given its original weight and moments; returns its
            log entry (None: no layer is changed one by one).
        rework_block: changes one block after its layers; returns its log entry.

    Side effects: the new blocks replace the compressed ones (in the model, and in the work
    folder's shards); every block is committed (a rerun resumes). Memory holds one block
    and one batch: both streams and each block's original inputs are work files.

    Returns:
        The log entries of every layer, in order (those of an interrupted run included).
    """
    sm, work = run.sm, run.work
    again = BlockRun(sm, work, None, run.targets, distributed.my_batches(calibration,
                                                                        batch_size))
    again.compressed = True
    log = list(work.progress.get(f"{step}_log", []))
    finish_moves(work, step)
    first = not work.done(step)
    again.kwargs(write_inputs=first)
    if first and paired:  # both streams start at the same inputs
        for b in range(len(again.batches)):
            save_tensors(work.file("acts-original", 0, b), {"h": again.acts(0, b)})
    ranks = {r["name"]: r["rank"] for r in work.progress["results"]}
    for index in tqdm(range(work.done(step), len(sm.blocks)), desc=f"{step} blocks",
                      unit="block"):
        block = again.block(index)
        names = [n for n in run.by_block.get(index, [])
                 if isinstance(sm.model.get_submodule(n), LowRankLinear)]
        if paired:  # only a layer rework reads the layers' original inputs
            _original_stream(again, block, index, names, record=rework_layer is not None)
        groups = [] if rework_layer is None else _shared_input_groups(
            block, names, sm.model, (again.acts(index, 0), again.kwargs()[0]),
            again.sources[index])
        for group in groups:
            moments = _paired_moments(again, block, index, group, paired)
            for name in group:
                original = load_tensors(work.file("originals", name))["w"]
                log.append(rework_layer(sm.model, name, original, moments[name]))
        if rework_block is not None:
            log.append(rework_block(again, block, index, names))
        again.forward(block, index)
        save_block(work, _NEW_BLOCKS[step], sm, index, ranks)
        work.commit(**{step: index + 1, f"{step}_log": log})
        finish_moves(work, step)
        for kind in ("acts", "acts-original", "seen"):
            work.drop(kind, index)
        sm.release(block)
    for kind in ("acts", "acts-original"):
        work.drop(kind)
    return log


def finish_moves(work, step: str) -> None:
    """Moves the committed new blocks of pass ``step`` over the compressed ones (a run
    killed between a commit and its move finishes it) and drops an uncommitted one."""
    work.move_files(_NEW_BLOCKS[step], "blocks",
                    lambda shard: int(shard.stem.split("-")[1]) < work.done(step))


def swap_factors(model: nn.Module, name: str, w_u: torch.Tensor, w_v: torch.Tensor) -> None:
    """Replaces the factorized layer ``name`` by one of factors ``w_u``, ``w_v`` with its
    bias, dtype, device and int8 layout (int8 rows quantized again from the new factors)."""
    layer: LowRankLinear = model.get_submodule(name)
    old_u = layer.weight_u
    rebuilt = LowRankLinear.from_factors(w_u, w_v, layer.bias, dtype=old_u.dtype,
                                         plan=layer.plan)
    model.set_submodule(name, rebuilt.to(old_u.device))


def paired_error(weight: torch.Tensor, approx: torch.Tensor, moments: PairedMoments,
                 metric: linalg.Whitening | None = None) -> float:
    """E‖W x_o − W′ x_c‖² per token (float64) from the paired moments: W the original
    layer, W′ = ``approx``; x_o = x_c when the moments are not paired. With ``metric`` T,
    the error is measured on Tᵀ(W x_o − W′ x_c) (the output metric T Tᵀ)."""
    device = moments.cc.device
    w, a = (t.detach().to(device, torch.float64) for t in (weight, approx))
    if metric is not None:
        root = metric.root.to(device, torch.float64)
        w, a = root.T @ w, root.T @ a
    oo, oc = moments.target_moments()
    total = (torch.einsum("ij,jk,ik->", w, oo, w) - 2 * torch.einsum("ij,jk,ik->", w, oc, a)
             + torch.einsum("ij,jk,ik->", a, moments.cc, a))
    return float(total) / max(1, moments.count)


def anchor_blocks(run: BlockRun, calibration: Calibration, batch_size: int) -> list[dict]:
    """Cuts every factorized layer of the decoder blocks again, at its rank, by the anchored
    objective min ‖W X − W′ X′‖: a :func:`rework_blocks` pass with paired moments.

    For io-svd the error is measured in its output metric, min ‖Tᵀ(W X − W′ X′)‖ with T
    the layer's output whitening from the compression (work files whitening/<layer>): the
    anchored cut keeps the two-sided whitening that chose the ranks. A layer keeps its first
    cut when the anchored one does not lower that error (it is the objective's optimum, so
    only damping can make it worse).

    Returns:
        One {module, error_before, error_after, relative_after} entry per layer (errors
        per token, relative to E‖W x‖²).
    """
    def anchor(model: nn.Module, name: str, weight: torch.Tensor, moments: PairedMoments
               ) -> dict:
        metric = load_whitening(run.work, name)[1] if run.anchored_metric else None
        return anchor_layer(model, name, weight, moments, metric)

    return rework_blocks(run, "anchor", calibration, batch_size, True, anchor)


def anchor_layer(model: nn.Module, name: str, weight: torch.Tensor, moments: PairedMoments,
                 metric: linalg.Whitening | None = None) -> dict:
    """Cuts layer ``name`` again at its rank from its original ``weight`` by the anchored
    objective (in the output ``metric`` T when given), unless that does not lower the
    paired error; returns the log entry."""
    layer: LowRankLinear = model.get_submodule(name)
    w_u, w_v = layer.factors()
    count = max(1, moments.count)
    whitening = linalg.cholesky_whitening(moments.cc / count, overwrite=True)
    decomposition = linalg.decompose(weight, input_whitening=whitening,
                                     output_whitening=metric, cross=moments.oc / count)
    new_u, new_v = decomposition.factors(w_u.shape[1])
    before = paired_error(weight, w_u.double() @ w_v.double(), moments, metric)
    after = paired_error(weight, new_u @ new_v, moments, metric)
    scale = paired_error(weight, torch.zeros_like(new_u @ new_v), moments, metric)
    if torch.isfinite(new_u).all() and torch.isfinite(new_v).all() and after <= before:
        swap_factors(model, name, new_u, new_v)
    else:
        after = before
    relative = after / max(scale, 1e-300)
    logger.info("anchor %s: error %.4g -> %.4g (relative %.4f)", name, before, after, relative)
    return {"module": name, "error_before": before, "error_after": after,
            "relative_after": relative}


def _original_layers(work, block_names: list[str], model: nn.Module) -> dict[str, nn.Linear]:
    """The original dense layers of ``block_names`` (weights from the work folder, biases
    as the factorized layers kept them)."""
    layers = {}
    for name in block_names:
        low_rank = model.get_submodule(name)
        weight = load_tensors(work.file("originals", name), low_rank.weight_u.device)["w"]
        layer = nn.Linear(low_rank.in_features, low_rank.out_features,
                          bias=low_rank.bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if low_rank.bias is not None:
            layer.bias = nn.Parameter(low_rank.bias.detach().clone(), requires_grad=False)
        layers[name] = layer
    return layers


def _original_stream(run: BlockRun, block: nn.Module, index: int, names: list[str],
                     record: bool = True) -> None:
    """Runs ``block`` with its original layers on the original stream: writes the block's
    outputs as the next block's original inputs and, with ``record``, each named layer's
    input per batch (seen/<block>/<batch>; an input several layers share, under the first
    of them)."""
    model, work = run.sm.model, run.work
    compressed = {name: model.get_submodule(name) for name in names}
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def keep(module, args, output):
            seen[name] = args[0]  # the tensor itself: shared inputs are told by identity
        return keep

    _swap(model, _original_layers(work, names, model))
    handles = _hooked(model, names if record else [], hook)
    try:
        with torch.no_grad():
            for b in range(len(run.batches)):
                hidden = load_tensors(work.file("acts-original", index, b), run.sm.device)["h"]
                out = run.run(block, index, b, hidden)
                save_tensors(work.file("acts-original", index + 1, b), {"h": out})
                if record:
                    _save_distinct(work.file("seen", index, b), seen)
    finally:
        for handle in handles:
            handle.remove()
        _swap(model, compressed)


def _save_distinct(path: Path, seen: dict[str, torch.Tensor]) -> None:
    """Saves the recorded inputs ``seen`` to ``path``, an input shared by several layers
    (q/k/v) once, under the first of them; empties ``seen``."""
    distinct: dict[str, torch.Tensor] = {}
    for name, tensor in seen.items():
        if not any(tensor is kept for kept in distinct.values()):
            distinct[name] = tensor
    save_tensors(path, distinct)
    seen.clear()


def _hooked(model: nn.Module, names: list[str], make_hook):
    """Registers ``make_hook(name)`` as a forward hook on each named module; returns the
    handles."""
    return [model.get_submodule(name).register_forward_hook(make_hook(name)) for name in names]


def _shared_input_groups(block, names: list[str], model, batch, source) -> list[list[str]]:
    """Runs ``block`` on one batch and groups ``names`` in call order by shared input
    tensor (q/k/v together, gate/up together). The tensors are kept until grouped: an id
    alone could be reused by a later input once the earlier tensor is freed."""
    order: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def record(module, args, output):
            order.append((name, args[0]))
        return record

    handles = _hooked(model, names, hook)
    try:
        with torch.no_grad():
            run_block(block, [batch], source)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for position, (name, tensor) in enumerate(order):
        if position and tensor is order[position - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _paired_moments(run: BlockRun, block, index: int, names: list[str], paired: bool
                    ) -> dict[str, PairedMoments]:
    """Runs ``block`` on the compressed stream and accumulates the inputs of the layers
    ``names``, paired (``paired``) with their original inputs recorded for the same batch.
    Returns {layer: PairedMoments}."""
    model = run.sm.model
    layers = {name: model.get_submodule(name) for name in names}
    moments = {name: PairedMoments.zeros(layer.in_features, layer.weight_u.device,
                                         paired=paired)
               for name, layer in layers.items()}
    current: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):  # the group's first layer holds a shared input
            moments[name].update(args[0].detach(), current.get(name, current.get(names[0])))
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for b in range(len(run.batches)):
                if paired:
                    current = load_tensors(run.work.file("seen", index, b), run.sm.device)
                run.run(block, index, b)
    finally:
        for handle in handles:
            handle.remove()
    _sum_over_processes(moments)
    return moments


def _sum_over_processes(moments: dict[str, PairedMoments]) -> None:
    """Sums every layer's moments over the torchrun processes, in place (no-op alone)."""
    distributed.sum_tensors(t for m in moments.values() for t in (m.cc, m.oo, m.oc)
                            if t is not None)
    counts = distributed.sum_numbers(*(m.count for m in moments.values()))
    for moment, count in zip(moments.values(), counts, strict=True):
        moment.count = count


def _swap(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        model.set_submodule(name, module)
