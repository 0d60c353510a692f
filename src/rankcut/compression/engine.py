"""The compression engine: every strategy written once, run block by block over an executor.

A run goes through the decoder blocks one at a time. Calibration activations and
back-propagated vectors live in a work folder (``compression.workfolder``), one file per batch,
so memory holds one block, its statistics and one batch's activations, never the whole
model's. Two executors hold the weights:

- ``ResidentModel``: the model is in memory (``rankcut.compress``); compressed layers are
  swapped into it.
- ``streaming.StreamedModel``: the model is an empty skeleton and each part is read from
  the safetensors shards only while it is needed (``rankcut compress --stream``); each
  compressed block is written to a shard.

The strategies:

- uniform ranks (or a given rank map): each block's statistics are gathered, its layers
  factorized and swapped in, and its outputs become the next block's inputs;
- decompose-then-allocate (SVD-LLM v2): every layer is decomposed block by block and its
  factors stored, then the ranks are allocated from the truncation losses;
- global selection (zero-sum, io-svd; FWSVD's row Fisher): a forward pass keeps every
  block's input, the head turns the last one into the loss gradient and IO-SVD's KL seed
  vectors, and the blocks are recomputed from the top, each back-propagating its vectors to
  the block below while its layers' statistics (input moments, loss gradients G, output
  metric C, row Fisher) are accumulated and its layers decomposed; the selection then picks
  every rank (and the int8 rows of a remap) from what was stored.

Under ``torch.distributed`` every process runs its share of the calibration batches, the
statistics are summed over processes, each module is decomposed by the process that owns it
and its factors are broadcast.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .._version import __version__
from ..architecture import block_index, find_decoder_blocks
from ..calibration import distributed
from ..calibration.blocks import capture_block_inputs, kwarg_sources
from ..calibration.data import IGNORE, as_calibration
from ..calibration.hooks import InputMomentHooks
from ..core import fisher, linalg
from ..core.allocation import global_select, kept_params, loss_balanced_ranks, uniform_ranks
from ..core.hybrid import (
    RowPlan,
    classic_cost,
    classic_plan,
    factor_bytes,
    loss_aware_plans,
    row_loss_changes,
)
from ..errors import CalibrationError, ConfigError
from ..io.checkpoint import (
    add_markers,
    marker_key,
    replace_with_low_rank,
    safetensors_problem,
)
from ..methods import MethodConfig, method_spec
from ..nn.modules import LowRankLinear
from .workfolder import WorkFolder, load_tensors, save_tensors

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class ModuleResult:
    """What happened to one target module."""

    name: str
    shape: tuple[int, int]
    rank: int | None  # None: kept dense (rank at or above break-even)
    loss: float  # whitened truncation loss Σ discarded σ²
    relative_loss: float  # loss / Σ σ²
    seconds: float
    int8: dict[str, int] = field(default_factory=dict)  # hybrid layout (u_int8, v_int8, …)

    @property
    def bytes16(self) -> int:
        """Bytes with 16-bit values (dense or factors), int8 rows and 16-bit scales."""
        m, n = self.shape
        if self.rank is None:
            return 2 * m * n
        return factor_bytes(m, n, self.rank, self.int8.get("u_int8", 0),
                            self.int8.get("v_int8", 0))


@dataclass
class UpdateReport:
    """What a parameter update did: refit errors per module, or the LoRA loss curve."""

    settings: dict
    log: list[dict] = field(default_factory=list)


@dataclass
class CompressionReport:
    """The outcome of ``compress``: per-module results and the achieved ratio."""

    method: str
    settings: dict
    modules: list[ModuleResult] = field(default_factory=list)
    seconds: float = 0.0
    stage_losses: list[float] = field(default_factory=list)  # calibration loss after stage k
    anchor_log: list[dict] = field(default_factory=list)  # the anchored re-cut, per layer
    update: UpdateReport | None = None  # the parameter update run after truncation, if any

    @property
    def dense_params(self) -> int:
        """Parameters of the target layers before compression."""
        return sum(m.shape[0] * m.shape[1] for m in self.modules)

    @property
    def kept_params(self) -> int:
        """Parameters of the target layers after compression."""
        return sum(linalg.factored_params(*m.shape, m.rank) for m in self.modules)

    @property
    def achieved_ratio(self) -> float:
        """Fraction of target-layer parameters actually removed."""
        return 1.0 - self.kept_params / max(1, self.dense_params)

    @property
    def achieved_byte_ratio(self) -> float:
        """Fraction of the target layers' 16-bit bytes removed (int8 rows counted as such)."""
        dense = sum(2 * m.shape[0] * m.shape[1] for m in self.modules)
        return 1.0 - sum(m.bytes16 for m in self.modules) / max(1, dense)

    @property
    def rank_map(self) -> dict[str, int | None]:
        """{module name: rank, or None when kept dense}."""
        return {m.name: m.rank for m in self.modules}

    @property
    def int8_layout(self) -> dict[str, dict[str, int]]:
        """{module: its int8 layout (``u_int8``, ``v_int8``, ``v_int8_start``)} for the
        modules with int8 rows."""
        return {m.name: m.int8 for m in self.modules if m.int8}

    def quantization_config(self) -> dict:
        """Returns the ``quantization_config`` entry written into config.json."""

        return {
            "quant_method": "rankcut",
            "format_version": FORMAT_VERSION,
            "rankcut_version": __version__,
            "method": self.method,
            "settings": self.settings,
            "target_ratio": self.settings.get("ratio"),
            "achieved_ratio": round(self.achieved_ratio, 6),
            "achieved_byte_ratio": round(self.achieved_byte_ratio, 6),
            "rank_map": self.rank_map,
            "int8_layout": self.int8_layout,
            "update": self.update.settings if self.update else None,
        }



def check_processes(update) -> None:
    """Refuses, under torchrun, an update that trains the whole model at once (lora and the
    chains ending in it); the block-wise ones are distributed."""
    if update is not None and update.whole_model and distributed.world()[1] > 1:
        raise ConfigError(f"the {update.name} update trains the whole model at once and is not "
                          "distributed; run it in one process (without torchrun), or use "
                          "--update refit or block, which are")


def check_inputs(model, config, targets, calibration, rank_map, update) -> None:
    """Refuses what a run cannot do, before any work (see ``pipeline.compress``'s errors)."""
    check_processes(update)
    if update is not None and (calibration is None or calibration.numel() == 0):
        raise ConfigError(f"the {update.name} update needs calibration token ids")
    if update is not None and update.needs_output_metric and not config.needs_output_stats:
        raise ConfigError(f"--block-weight kl weights the block error by IO-SVD's output "
                          f"metric, which method {config.name!r} does not gather; use "
                          "--method io-svd, or --block-weight mse")
    if update is not None and update.whole_model and calibration.has_images:
        raise ConfigError(f"--update {update.name}: the lora update trains on text only; drop "
                          "--calib-images or use --update refit or block")
    if config.needs_row_fisher and (calibration is None or calibration.numel() == 0):
        raise CalibrationError(f"method {config.name!r} needs calibration token ids")
    if config.needs_input_stats and (calibration is None or calibration.numel() == 0):
        raise CalibrationError(f"method {config.name!r} needs calibration token ids")
    if rank_map is not None and set(rank_map) != set(targets):
        missing = sorted(set(targets) - set(rank_map))[:3]
        extra = sorted(set(rank_map) - set(targets))[:3]
        raise ConfigError(f"rank map does not match the target modules (missing {missing}, "
                          f"unknown {extra})")
    prefix = find_decoder_blocks(model)[0]
    outside = [name for name in targets if block_index(name, prefix) is None]
    head = model.get_output_embeddings()
    before = [name for name in outside if targets[name] is not head]
    if getattr(config, "stages", 1) > 1 and before:
        raise ConfigError(f"correction stages (--stages > 1) re-cut the layers of the decoder "
                          f"blocks and the LM head, and {before[0]} comes before the blocks: "
                          "use --stages 1, or leave it out (--exclude)")
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in targets.items()}
    if rank_map is not None:
        _check_rank_map_fits(rank_map, shapes)
    elif config.allocation == "global" and getattr(config, "remap", None) is None:
        _check_min_rank_fits(getattr(config, "min_rank", 1), config.ratio, shapes)


def _check_rank_map_fits(rank_map: dict, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuses a rank above min(m, n): it cannot be factorized and used to be cut silently."""
    for name, rank in rank_map.items():
        m, n = shapes[name]
        if rank is not None and rank > min(m, n):
            raise ConfigError(f"rank map gives {name} rank {rank}, above min(m, n) = "
                              f"{min(m, n)} of its {m}x{n} weight")


def _check_min_rank_fits(min_rank: int, ratio: float, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuses, before any statistics, a ``min_rank`` whose floor already exceeds the budget."""
    if min_rank <= 1:
        return
    total = sum(m * n for m, n in shapes.values())
    floor = sum(kept_params(m, n, min(min_rank, m, n)) for m, n in shapes.values())
    if floor > (1.0 - ratio) * total:
        raise ConfigError(f"min_rank {min_rank} keeps at least {floor:,} of the {total:,} target "
                          f"parameters, more than the {(1.0 - ratio) * total:,.0f} that ratio "
                          f"{ratio} allows; lower min_rank or the ratio")



def factorize(model: nn.Module, layers: dict[str, nn.Linear], ranks: dict[str, int | None],
               decompose: Callable[[str], linalg.Decomposition | None],
               plans: dict[str, RowPlan] | None = None, log: bool = True
               ) -> dict[str, ModuleResult]:
    """Swaps every layer of ``layers`` for its factors at ``ranks`` (None: kept dense).

    The layers go W (the number of processes) at a time: in each group, every rank cuts the
    modules it owns (``decompose`` returns None for the others), the cuts are broadcast and
    every rank swaps in all of them. Side effects: replaces modules of ``model``; logs one
    line per module unless ``log`` is False.

    Returns:
        {module: its result}, in the order of ``layers``.
    """
    names, size = list(layers), distributed.world()[1]
    results = {}
    for first in range(0, len(names), size):
        start, group = time.perf_counter(), names[first:first + size]
        held = {}
        for name in group:
            decomposition = decompose(name)
            if decomposition is not None:
                held[name] = _cut(decomposition, ranks[name])
        cuts = distributed.share(held, {name: _cut_shapes(layers[name], ranks[name])
                                        for name in group})
        for name in group:
            results[name] = _swap(model, name, layers[name], cuts[name], ranks[name],
                                  (plans or {}).get(name), start, log)
    return results


def _cut(decomposition: linalg.Decomposition, rank: int | None) -> list[torch.Tensor]:
    """[σ] for a module kept dense, [σ, W_u, W_v] for one cut at ``rank`` (float64)."""
    factors = decomposition.factors(rank) if rank is not None else ()
    return [decomposition.sigma, *factors]


def _cut_shapes(layer: nn.Linear, rank: int | None) -> list[tuple[int, ...]]:
    m, n = layer.weight.shape
    return [(min(m, n),)] + ([(m, rank), (rank, n)] if rank is not None else [])


def _swap(model: nn.Module, name: str, layer: nn.Linear, cut: list[torch.Tensor],
          rank: int | None, plan: RowPlan | None, start: float, log: bool) -> ModuleResult:
    """Swaps ``layer`` for the factors of ``cut`` (a dense module stays), with the int8
    rows of ``plan`` when given; logs one line unless ``log`` is False."""
    m, n = layer.weight.shape
    sigma = cut[0]
    kept = sigma.numel() if rank is None else rank
    loss = float(sigma[kept:].square().sum())
    total = float(sigma.square().sum()) or 1.0
    int8 = {}
    if rank is not None:
        new = LowRankLinear.from_factors(cut[1], cut[2], layer.bias, dtype=layer.weight.dtype,
                                         plan=plan)
        model.set_submodule(name, new.to(layer.weight.device))
        int8 = {k: v for k, v in new.layout.items() if k != "rank"}
    result = ModuleResult(name, (m, n), rank, loss, loss / total, time.perf_counter() - start,
                          int8)
    if log:
        extra = f" int8 u={int8['u_int8']} v={int8['v_int8']}" if int8 else ""
        logger.info("%s [%dx%d] rank=%s%s loss=%.4g rel=%.4f %.2fs", name, m, n,
                    "dense" if rank is None else rank, extra, loss, result.relative_loss,
                    result.seconds)
    return result



class Executor(Protocol):
    """Where a block-wise run finds the model's weights: ``ResidentModel`` (in memory) or
    ``streaming.StreamedModel`` (read from shards on demand).

    Attributes:
        model: the model (a skeleton with meta parameters when streamed).
        prefix, blocks: the decoder block list and its qualified name.
        device: where blocks are computed.
    """

    model: nn.Module
    prefix: str
    blocks: nn.ModuleList
    device: torch.device

    def block(self, index: int) -> nn.Module:
        """Makes decoder block ``index`` usable and returns it."""

    def release(self, module: nn.Module) -> None:
        """Frees ``module``'s weights if the executor can read them again."""

    def parts(self, modules: list[nn.Module]) -> contextlib.AbstractContextManager:
        """A context in which ``modules`` are usable."""

    def outside(self, skip_head: bool) -> list[nn.Module]:
        """The modules outside the decoder blocks that hold parameters."""

    def write_block(self, work: WorkFolder, index: int, ranks: dict) -> None:
        """Keeps compressed block ``index`` (a shard in ``work`` when streamed)."""

    def keep_outside(self, work: WorkFolder, names: list[str], ranks: dict) -> None:
        """Keeps the compressed modules ``names`` outside the blocks (work files read
        back on later loads, when streamed)."""

    def restore_outside(self, work: WorkFolder, results: list[dict]) -> None:
        """Puts back the compressed modules outside the blocks that ``results`` (of an
        interrupted run) name."""


def outside_modules(model: nn.Module, blocks: nn.ModuleList, skip_head: bool) -> list[nn.Module]:
    """The modules outside the decoder blocks that hold parameters (embeddings, norms, the
    head), without the output embeddings when ``skip_head`` and without the input
    embeddings otherwise (tied ones are kept: they are the same matrix)."""
    tied = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    skip = tied if skip_head else embeddings
    if (tied is not None and embeddings is not None
            and getattr(tied, "weight", None) is embeddings.weight):
        skip = None
    inside = {id(m) for m in blocks.modules()}
    return [module for module in model.modules()
            if id(module) not in inside and module is not skip
            and next(module.parameters(recurse=False), None) is not None]


def block_state(sm: Executor, index: int, ranks: dict) -> dict[str, torch.Tensor]:
    """The state dict of compressed block ``index`` under its qualified names, with the
    one-element markers of its factorized modules (the checkpoint format's)."""
    prefix = f"{sm.prefix}.{index}."
    return add_markers(dict(sm.blocks[index].state_dict(prefix=prefix)),
                       [name for name, rank in ranks.items() if rank and name.startswith(prefix)])


def save_block(work: WorkFolder, kind: str, sm: Executor, index: int, ranks: dict) -> None:
    """Writes compressed block ``index`` to the work file ``<kind>/block-<index>``."""
    save_tensors(work.file(kind, f"block-{index:05d}"), block_state(sm, index, ranks))


def load_block(work: WorkFolder, kind: str, sm: Executor, index: int) -> nn.Module:
    """Loads block ``index`` from the work file :func:`save_block` wrote into the model
    (whose block must have the same modules and layouts) and returns it. Side effect: the
    block's parameters become the loaded tensors; the executor releases them as usual."""
    prefix = f"{sm.prefix}.{index}."
    block = sm.blocks[index]
    markers = {marker_key(name) for name, module in block.named_modules()
               if isinstance(module, LowRankLinear)}
    stored = load_tensors(work.file(kind, f"block-{index:05d}"), sm.device)
    state = {name[len(prefix):]: tensor for name, tensor in stored.items()}
    block.load_state_dict({k: v for k, v in state.items() if k not in markers}, assign=True)
    for module in block.modules():
        if isinstance(module, LowRankLinear):
            module.use_fast_layout_()
    return block


def save_outside(work: WorkFolder, kind: str, sm: Executor, name: str) -> None:
    """Writes compressed module ``name`` outside the blocks (loaded) to the work file
    ``<kind>/<name>``, with its marker (what ``StreamedModel.keep_outside`` writes)."""
    module = sm.model.get_submodule(name)
    save_tensors(work.file(kind, name), add_markers(dict(module.state_dict(prefix=name + ".")),
                                                    [name]))


def load_outside(work: WorkFolder, kind: str, sm: Executor, name: str) -> None:
    """Loads module ``name`` outside the blocks from the work file :func:`save_outside`
    wrote (same layout). Side effect: the module's parameters become the loaded tensors."""
    module = sm.model.get_submodule(name)
    stored = load_tensors(work.file(kind, name), sm.device)
    module.load_state_dict({key[len(name) + 1:]: value for key, value in stored.items()
                            if key != marker_key(name)}, assign=True)
    module.use_fast_layout_()


class ResidentModel:
    """The executor of a model held in memory: every part is always there, and compressed
    layers are swapped into the model itself."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.prefix, self.blocks = find_decoder_blocks(model)
        self.device = next(model.parameters()).device

    def block(self, index: int) -> nn.Module:
        return self.blocks[index]

    def release(self, module: nn.Module) -> None:
        """Nothing to free: the weights stay in memory."""

    def parts(self, modules: list[nn.Module]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def outside(self, skip_head: bool) -> list[nn.Module]:
        return outside_modules(self.model, self.blocks, skip_head)

    def write_block(self, work: WorkFolder, index: int, ranks: dict) -> None:
        """Nothing to write: the block was compressed in place."""

    def keep_outside(self, work: WorkFolder, names: list[str], ranks: dict) -> None:
        """Nothing to write: the modules were compressed in place."""

    def restore_outside(self, work: WorkFolder, results: list[dict]) -> None:
        """Nothing to restore: an in-memory run never resumes."""


@contextlib.contextmanager
def _head_only(sm: Executor):
    """Makes a forward pass from ``inputs_embeds`` run only the head: empties the decoder
    block list, and zeroes learned position embeddings (OPT, GPT-2 style), whose values
    are already in the hidden states the blocks produced."""
    owner, _, leaf = sm.prefix.rpartition(".")
    parent = sm.model.get_submodule(owner)
    tokens = sm.model.get_input_embeddings()
    positions = [m for m in sm.outside(False) if isinstance(m, nn.Embedding) and m is not tokens]
    handles = [m.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
               for m in positions]
    setattr(parent, leaf, nn.ModuleList())
    try:
        yield
    finally:
        setattr(parent, leaf, sm.blocks)
        for handle in handles:
            handle.remove()


def rebuild_layouts(model: nn.Module, results: list[dict], dtype: torch.dtype) -> list[str]:
    """Gives each factorized module of ``results`` (committed module results) that ``model``
    does not hold as a ``LowRankLinear`` yet an empty one on the meta device, of its rank
    and int8 layout, so that its stored tensors load into it (a resumed run). Returns the
    names replaced."""
    missing = {r["name"]: r for r in results if r["rank"] is not None
               and not isinstance(model.get_submodule(r["name"]), LowRankLinear)}
    if missing:
        replace_with_low_rank(model, {n: r["rank"] for n, r in missing.items()}, dtype, "meta",
                              {n: r["int8"] for n, r in missing.items() if r["int8"]})
    return list(missing)


def sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss of one sample's ``logits`` [1, L, V] on ``targets`` [L]
    (``IGNORE`` where nothing is predicted).

    Raises:
        CalibrationError: the loss is not finite.
    """
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE,
                           reduction="sum")
    if not torch.isfinite(loss):
        raise CalibrationError("calibration loss is not finite; the model produced NaN/inf")
    return loss


def head_logits(sm: Executor, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of the model's head (final norm, lm_head, any soft-capping) applied to the
    last block's output ``hidden`` [B, T, H]; the head must be loaded."""
    with _head_only(sm):
        return sm.model(inputs_embeds=hidden, use_cache=False).logits


class BlockRun:
    """The steps of one block-wise compression over an executor, each resumable from the
    work folder.

    The activations entering block i are the files acts/i/<batch>; each step writes the
    next block's and deletes the ones no later step reads.
    """

    def __init__(self, sm: Executor, work: WorkFolder, config: MethodConfig | None,
                 targets: dict[str, nn.Linear], batches: list[torch.Tensor],
                 grad_batches: int = 0) -> None:
        self.sm, self.work, self.config, self.targets = sm, work, config, targets
        self.batches, self.grad_batches = batches, grad_batches
        self.idle_steps = 0  # lockstep KL draw steps this process has no batch at
        self.by_block: dict[int | None, list[str]] = {}  # None: outside the blocks
        for name in targets:
            self.by_block.setdefault(block_index(name, sm.prefix), []).append(name)
        head = sm.model.get_output_embeddings()
        outside = self.by_block.get(None, [])
        self.post = [name for name in outside if targets[name] is head]  # run after the blocks
        self.pre = [name for name in outside if name not in self.post]  # run before them
        self.pre_stats: dict[str, linalg.SecondMoment] = {}
        self.sources = kwarg_sources(sm.model, len(sm.blocks))
        self._kwargs: list[dict] | None = None
        self.compressed = False  # blocks come from the work shards (correction stages)
        self.correcting = getattr(config, "stages", 1) > 1
        # a block-wise pass follows (anchored, refit, block): every process reads every
        # layer's original weight, not only the layers it decomposed
        self.reworked = False
        # the anchored re-cut follows and measures its error in the method's output metric
        # (io-svd): every process keeps every layer's output whitening T
        self.anchored_metric = False
        # write each block's output metric (IO-SVD's KL metric on the residual stream) for
        # the KL-weighted block refinement: work files metric/<block>
        self.block_metric = False

    @property
    def durable(self) -> bool:
        """Whether every process keeps its blocks and the original weights (correction
        stages, or a block-wise pass after the cut)."""
        return self.correcting or self.reworked

    @property
    def spec(self):
        return method_spec(self.config.name)

    # -- activations ---------------------------------------------------------------------

    def kwargs(self, write_inputs: bool = False) -> list[dict]:
        """The keyword arguments each block gets, per batch. The first call (and every call
        with ``write_inputs``) loads the embeddings, captures every batch's first-block
        input (written to acts/0 unless already committed, or when ``write_inputs``) and
        releases the embeddings again."""
        if self._kwargs is not None and not write_inputs:
            return self._kwargs
        sm, work = self.sm, self.work
        self._kwargs = []
        pre = {name: self.targets[name] for name in self.pre
               if sm.model.get_submodule(name) is self.targets[name]}  # not compressed yet
        pre = pre if self.config is not None and self.config.needs_input_stats else {}
        with sm.parts(sm.outside(skip_head=True)), self._blocks_before_last_capture(), \
                InputMomentHooks(pre) as hooks:
            for b, ids in enumerate(self.batches):
                hooks.new_batch()
                (hidden, kwargs), = capture_block_inputs(sm.model, sm.blocks, [ids])
                self._kwargs.append(kwargs)
                if write_inputs or not work.done("capture"):
                    if not torch.isfinite(hidden).all():
                        raise CalibrationError("non-finite (NaN/inf) activations at the "
                                               "input of the first decoder block")
                    save_tensors(work.file("acts", 0, b), {"h": hidden})
        if pre:
            distributed.sum_moments(hooks.stats)
            self.pre_stats = _reached(hooks.stats)
        work.commit(capture=1)
        return self._kwargs

    @contextlib.contextmanager
    def _blocks_before_last_capture(self):
        """Loads the blocks that run before the last block whose keyword arguments are
        captured (Gemma 3's first full-attention block), for the context."""
        needed = [self.block(i) for i in range(max(self.sources))]
        try:
            yield
        finally:
            for block in needed:
                self.sm.release(block)

    def block(self, index: int) -> nn.Module:
        """Loads block ``index`` as the run now has it: the original, or once the blocks
        are corrected (``self.compressed``), the compressed one from its work shard."""
        if self.compressed:
            return load_block(self.work, "blocks", self.sm, index)
        return self.sm.block(index)

    def acts(self, index: int, b: int) -> torch.Tensor:
        """The input of block ``index`` on batch ``b``."""
        return load_tensors(self.work.file("acts", index, b), self.sm.device)["h"]

    def run(self, block: nn.Module, index: int, b: int,
            hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Runs ``block`` on batch ``b`` (its stored input unless ``hidden`` is given)."""
        hidden = self.acts(index, b) if hidden is None else hidden
        out = block(hidden, **self._kwargs[b][self.sources[index]])
        return out[0] if isinstance(out, (tuple, list)) else out

    def forward(self, block: nn.Module, index: int, batches: int | None = None) -> None:
        """Writes ``block``'s outputs on every batch (or the first ``batches``) as the next
        block's inputs."""
        with torch.no_grad():
            for b in range(len(self.batches) if batches is None else batches):
                save_tensors(self.work.file("acts", index + 1, b),
                             {"h": self.run(block, index, b)})

    def block_stats(self, block, index, names, write_next: bool
                    ) -> dict[str, linalg.SecondMoment]:
        """Runs the block on every batch with input hooks on ``names``; ``write_next``
        also writes its outputs as the next block's inputs."""
        with InputMomentHooks({n: self.targets[n] for n in names}) as hooks, torch.no_grad():
            for b in range(len(self.batches)):
                hooks.new_batch()
                out = self.run(block, index, b)
                if write_next:
                    save_tensors(self.work.file("acts", index + 1, b), {"h": out})
        return hooks.stats

    # -- resuming ----------------------------------------------------------------------

    def recover(self, mode: str) -> None:
        """Checks the work files that the committed steps left for the steps still to run
        (``mode``: see :func:`_mode`): each must exist, and its header and size must be
        whole. A damaged or missing one is logged with a warning naming it, and the
        progress goes back to the last step that can recompute it: the step before it for
        an activation of the forward pass or a block shard written from stored factors,
        the start otherwise (the inputs of other steps are deleted once used). Side
        effects: commits the rolled-back progress or deletes the work folder; under
        torchrun every process starts over unless all kept the same steps.
        """
        damaged = [(path, problem, back) for path, back in self._resume_files(mode)
                   if (problem := safetensors_problem(path))]
        for path, problem, _ in damaged:
            logger.warning("work file %s is damaged (%s); recomputing its step", path, problem)
        backs = [back for _, _, back in damaged]
        if None in backs:
            logger.warning("starting over: the damaged work files cannot be recomputed from "
                           "what is left in %s", self.work.path)
            self.work.start_over()
        elif backs:
            self._roll_back(*min(backs, key=lambda back: back[1]))
        if distributed.world()[1] > 1 and not distributed.agree(self.work.steps()):
            logger.warning("the processes kept different steps after checking their work "
                           "files; starting over")
            self.work.start_over()

    def _roll_back(self, step: str, count: int) -> None:
        """Commits ``step=count`` (``forward`` or ``written``), dropping the module results
        of the blocks that will be written again."""
        updates: dict = {step: count}
        if step == "written":
            kept = sum(len(self.by_block.get(i, [])) for i in range(count))
            updates["results"] = self.work.progress.get("results", [])[:kept]
        self.work.commit(**updates)

    def _resume_files(self, mode: str) -> list[tuple[Path, tuple[str, int] | None]]:
        """The work files the committed progress relies on, each with the step (name,
        count) to go back to when it is damaged, or None to start over."""
        backed = range(len(self.sm.blocks) - self.work.done("backward"), len(self.sm.blocks))
        metrics = [self.work.where("metric", i) for i in backed] if self.block_metric else []
        if self.anchored_metric:  # the output whitening of every layer the backward reached
            metrics += [self.work.where("whitening", name) for i in backed
                        for name in self.by_block.get(i, [])]
        return (self._block_resume_files(mode)
                + [(f, None) for f in self._outside_files(mode) + metrics])

    def _outside_files(self, mode: str) -> list[Path]:
        """The work files of the targets outside the blocks that the committed progress
        relies on: their stored factors, the inputs their next step reads, and the
        compressed modules kept as work files."""
        work, blocks, done = self.work, len(self.sm.blocks), self.work.done
        factored = []
        if mode == "backward":
            factored = (self.post if done("head") else []) + (self.pre if done("pre_stored")
                                                              else [])
        elif mode == "forward":
            factored = (self.pre if done("stored") else []) + (self.post if done("post_stored")
                                                               else [])
        files = [work.where("factors", name) for name in distributed.mine(factored)]
        if mode == "backward" and self.pre and done("backward") == blocks \
                and not done("pre_stored"):
            files += [work.where("grads", 0, b) for b in range(self.grad_batches)]
        top_next = (done("stored") == blocks and not done("post_stored") if mode == "forward"
                    else mode == "uniform" and self.config.needs_input_stats
                    and done("written") == blocks and not done("post"))
        if self.post and top_next:
            files += self._act_files(blocks)
        outside = set(self.pre + self.post)
        files += [work.where("outside", r["name"]) for r in work.progress.get("results", [])
                  if r["name"] in outside and r["rank"] is not None]
        return files

    def _block_resume_files(self, mode: str) -> list[tuple[Path, tuple[str, int] | None]]:
        """:meth:`_resume_files` of the decoder blocks."""
        work, blocks = self.work, len(self.sm.blocks)
        captured = work.done("capture") > 0
        if mode == "backward" and not work.done("head"):  # forward pass: acts/i from acts/i-1
            return [(f, ("forward", i - 1) if i else None)
                    for i in range(work.done("forward") + 1 if captured else 0)
                    for f in self._act_files(i)]
        if mode == "backward" and work.done("backward") < blocks:  # the block-wise backward
            left = blocks - work.done("backward")  # blocks 0 .. left-1 are still to go
            files = [f for i in range(left) for f in self._act_files(i)]
            files += [work.where("grads", left, b) for b in range(self.grad_batches)]
            return [(f, None) for f in files + self._factor_files(range(left, blocks))]
        if mode == "forward" and work.done("stored") < blocks:  # SVD-LLM v2's decompositions
            acts = self._act_files(work.done("stored")) if captured else []
            return [(f, None) for f in acts + self._factor_files(range(work.done("stored")))]
        if mode != "uniform":  # every factor is stored: blocks are written from them
            return ([(f, None) for f in self._factor_files(range(blocks))]
                    + self._block_files(rewritable=True))
        if not (captured and self.config.needs_input_stats):  # blocks need no activations
            return self._block_files(rewritable=True)
        written = work.done("written")  # uniform ranks from input statistics
        acts = self._act_files(written) if written < blocks else []
        return [(f, None) for f in acts] + self._block_files(rewritable=False)

    def _act_files(self, index: int) -> list[Path]:
        return [self.work.where("acts", index, b) for b in range(len(self.batches))]

    def _factor_files(self, indices: range) -> list[Path]:
        """The stored factor files of this process's targets in blocks ``indices``."""
        return [self.work.where("factors", name) for i in indices
                for name in distributed.mine(self.by_block.get(i, []))]

    def _block_files(self, rewritable: bool) -> list[tuple[Path, tuple[str, int] | None]]:
        """The block shards written so far (process 0 writes them), each with the step to
        go back to when it is damaged: rewriting it when ``rewritable``."""
        if distributed.world()[0] != 0 and not self.durable:
            return []
        # a corrected, re-cut or refitted block cannot be written again from the factors
        rewritable = rewritable and not any(self.work.done(step)
                                            for step in ("stage", "anchor", "refit", "refine"))
        return [(self.work.where("blocks", f"block-{i:05d}"), ("written", i) if rewritable
                 else None) for i in range(self.work.done("written"))]

    # -- writing the compressed blocks -------------------------------------------------

    def write_blocks(self, ranks: dict, plans: dict, stored: bool) -> None:
        """For each block not yet written: loads it, factorizes its targets at ``ranks``
        (from its input statistics, or from the factors an earlier step ``stored``),
        writes its shard and, when statistics are gathered here, the next block's inputs
        (computed after compression with ``config.sequential``). Commits every block."""
        sm, work, config = self.sm, self.work, self.config
        needs_acts = config.needs_input_stats and not stored
        results = work.progress.setdefault("results", [])
        if needs_acts:
            self.kwargs()
        if self.pre and not work.done("pre"):  # the blocks see the compressed outputs
            self._write_outside(self.pre, ranks, plans, stored, self.pre_stats)
            if needs_acts:
                self.kwargs(write_inputs=True)
            work.commit(pre=1, results=results)
        for index in tqdm(range(work.done("written"), len(sm.blocks)),
                          desc=f"{config.name} blocks", unit="block"):
            block = sm.block(index)
            names = self.by_block.get(index, [])
            after = config.sequential and names  # the next inputs come from the new block
            stats = self.block_stats(block, index, names, not after) if needs_acts else {}
            distributed.sum_moments(stats)
            decompose = functools.partial(self._decompose_owned, set(distributed.mine(names)),
                                          stats, stored, ranks)
            with torch.no_grad():
                done = factorize(sm.model, {n: self.targets[n] for n in names}, ranks,
                                  decompose, plans)
            for name in names:
                results.append(asdict(done[name]))
                if ranks[name] is not None:
                    self.targets[name].to("meta")  # swapped out: free its weight
            if needs_acts and after:
                self.forward(block, index)
            if self.durable:  # every process reads its blocks back (stages, a refit)
                save_block(work, "blocks", sm, index, ranks)
            else:
                sm.write_block(work, index, ranks)
            work.commit(written=index + 1, results=results)
            work.drop("acts", index)
            sm.release(block)
        if self.post and not work.done("post"):
            stats = self._head_stats() if needs_acts else {}
            self._write_outside(self.post, ranks, plans, stored, stats)
            work.commit(post=1, results=results)
            work.drop("acts", len(sm.blocks))

    def _write_outside(self, names: list[str], ranks: dict, plans: dict, stored: bool,
                       stats: dict) -> None:
        """Factorizes the targets ``names`` outside the blocks (from ``stats`` or the
        stored factors), appends their results and has the executor keep them."""
        sm, work = self.sm, self.work
        with sm.parts([self.targets[name] for name in names]):
            decompose = functools.partial(self._decompose_owned, set(distributed.mine(names)),
                                          stats, stored, ranks)
            with torch.no_grad():
                done = factorize(sm.model, {n: self.targets[n] for n in names}, ranks,
                                  decompose, plans)
            work.progress["results"].extend(asdict(done[name]) for name in names)
            sm.keep_outside(work, [n for n in names if ranks[n] is not None], ranks)
        for name in names:
            if ranks[name] is not None:
                self.targets[name].to("meta")

    def _head_stats(self) -> dict[str, linalg.SecondMoment]:
        """Input statistics of the targets after the blocks (the LM head) on every batch,
        from the last block's outputs."""
        sm = self.sm
        post = {name: self.targets[name] for name in self.post}
        with sm.parts(sm.outside(skip_head=False)), InputMomentHooks(post) as hooks:
            self._head_forward(range(len(self.batches)), hooks)
        distributed.sum_moments(hooks.stats)
        return _reached(hooks.stats)

    def _head_forward(self, batches: range, hooks: InputMomentHooks) -> None:
        """Runs the head (loaded) without gradients on the last block's outputs of
        ``batches``, one sample's logits at a time, for ``hooks`` to gather."""
        top = len(self.sm.blocks)
        with torch.no_grad():
            for b in batches:
                hidden = self.acts(top, b)
                for i in range(hidden.shape[0]):
                    hooks.new_batch()
                    head_logits(self.sm, hidden[i:i + 1])

    def use_written_layouts(self) -> None:
        """Gives a model that does not hold the compressed layers of its written blocks (a
        resumed streamed run) empty ``LowRankLinear`` modules of their layouts, so that
        the block shards load into it."""
        results = [r for r in self.work.progress["results"]
                   if block_index(r["name"], self.sm.prefix) is not None]
        rebuild_layouts(self.sm.model, results, next(iter(self.targets.values())).weight.dtype)

    def _decompose_owned(self, owned: set[str], stats: dict, stored: bool, ranks: dict,
                         name: str):
        """The decomposition of ``name`` when this process owns it (else None): its stored
        factors, or computed from its block's statistics. Before correction stages or a
        block-wise pass, a factorized module's original weight is kept in the work folder
        (by its owner for the stages; by every process before a block-wise pass, which
        reworks every layer on each) and, when computed here, its whitening."""
        if (self.durable and ranks[name] is not None
                and (name in owned or self.reworked)):
            save_tensors(self.work.file("originals", name), {"w": self.targets[name].weight})
        if name not in owned:
            return None
        if stored:
            return StoredFactors.load(self.work, name)
        decomposition = self.spec.decompose(self.config, self.targets[name].weight,
                                            _last_use(stats, name), None)
        if self.correcting and ranks[name] is not None:
            save_whitening(self.work, name, decomposition.input_whitening,
                           decomposition.output_whitening)
        return decomposition

    # -- methods that decompose everything first, then allocate -------------------------

    def store_by_forward(self) -> None:
        """SVD-LLM v2: decomposes every target from its block's input statistics and
        stores the factors, one block per committed step."""
        sm, work = self.sm, self.work
        self.scoring = self.loss_aware = False
        self.kwargs()
        if self.pre and not work.done("stored"):
            with sm.parts([self.targets[name] for name in self.pre]):
                self._store_all(self.pre, self.pre_stats, {}, {})
        for index in tqdm(range(work.done("stored"), len(sm.blocks)),
                          desc=f"{self.config.name} decompose", unit="block"):
            block = sm.block(index)
            names = self.by_block.get(index, [])
            stats = self.block_stats(block, index, names, write_next=True)
            distributed.sum_moments(stats)
            self._store_all(names, stats, {}, {})
            work.commit(stored=index + 1)
            work.drop("acts", index)
            sm.release(block)
        if self.post and not work.done("post_stored"):
            stats = self._head_stats()
            with sm.parts([self.targets[name] for name in self.post]):
                self._store_all(self.post, stats, {}, {})
            work.commit(post_stored=1)
            work.drop("acts", len(sm.blocks))

    def _store_all(self, names: list[str], stats: dict, outputs: dict, grads: dict) -> None:
        """Decomposes the targets ``names`` this process owns (their weights loaded) from
        their statistics and stores their factors, with the component scores
        (``self.scoring``) and the row loss changes (``self.loss_aware``)."""
        config = self.config
        with torch.no_grad():
            if self.anchored_metric:  # every process re-cuts every layer in this metric
                for name in set(names) - set(distributed.mine(names)):
                    if outputs.get(name) is not None:
                        save_whitening(self.work, name, None, linalg.cholesky_whitening(
                            _last_use(outputs, name).mean(), overwrite=True))
            for name in distributed.mine(names):
                moment = _last_use(stats, name)
                decomposition = self.spec.decompose(config, self.targets[name].weight, moment,
                                                    _last_use(outputs, name))
                grad = grads.pop(name, None)
                extra = {}
                if self.scoring:
                    extra["scores"] = self.spec.score(config, decomposition, grad)
                if self.loss_aware:  # each row's change is the same at every rank: store all
                    extra["u_changes"], extra["v_changes"] = row_loss_changes(
                        decomposition, decomposition.sigma.numel(), grad)
                StoredFactors.save(self.work, name, decomposition, extra,
                                   moment.count if moment is not None else 0)
                if self.correcting or self.anchored_metric:
                    save_whitening(self.work, name, decomposition.input_whitening,
                                   decomposition.output_whitening)
                del decomposition, moment, grad

    def store_by_backward(self, scoring: bool) -> None:
        """Zero-sum / IO-SVD: forward through every block keeping its inputs on disk, loss
        and KL seed vectors at the head, then a block-wise backward from the top that
        gathers each block's input statistics, loss gradients and output metric,
        decomposes its targets and stores their factors and component scores."""
        config = self.config
        self.scoring = scoring
        self.loss_aware = loss_aware = getattr(config, "remap", None) == "loss-aware"
        self.weight_grads = config.needs_row_fisher or (
            getattr(config, "needs_loss_gradients", False) and (scoring or loss_aware))
        self.seeds = config.top_k if config.needs_output_stats and config.kl_mode == "exact" \
            else int(config.needs_output_stats)
        if config.needs_output_stats and config.top_k == 1:
            logger.warning("top_k=1: the top-1 renormalized distribution is a point mass with "
                           "zero Fisher, so the output metric carries no information")
        self.kwargs()
        self._forward_all()
        self._head_vectors()
        sm, work = self.sm, self.work
        for index in tqdm(range(len(sm.blocks) - 1 - work.done("backward"), -1, -1),
                          desc=f"{config.name} backward", unit="block"):
            block = sm.block(index)
            names = self.by_block.get(index, [])
            layers = {name: self.targets[name] for name in names}
            stats, outputs, grads = self.backward_block(block, index, layers,
                                                        residual_metric=self.block_metric)
            self._store_all(names, stats, outputs, grads)
            work.commit(backward=len(sm.blocks) - index)
            work.drop("grads", index + 1)
            work.drop("acts", index)
            sm.release(block)
        if self.pre and not work.done("pre_stored"):
            self._pre_backward()
            work.commit(pre_stored=1)
        work.drop("grads", 0)

    def _forward_all(self) -> None:
        """Runs the original blocks on every batch, keeping every block's inputs."""
        sm, work = self.sm, self.work
        for index in tqdm(range(work.done("forward"), len(sm.blocks)), desc="forward",
                          unit="block"):
            block = sm.block(index)
            self.forward(block, index)
            work.commit(forward=index + 1)
            sm.release(block)

    def _head_vectors(self) -> None:
        """Loss and KL seed vectors at the last block's output, per gradient batch."""
        sm, work, config = self.sm, self.work, self.config
        if work.done("head"):
            return
        top = len(sm.blocks)
        generator = torch.Generator().manual_seed(getattr(config, "seed", 0))

        def draws(probs):  # every process replays the draws in global batch order
            return fisher.kl_draws(probs, config.kl_mode, generator)

        layers = {name: self.targets[name] for name in self.post}
        total, count = 0.0, 0
        with sm.parts(sm.outside(skip_head=False)), \
                InputMomentHooks(layers if config.needs_input_stats else {}) as hooks, \
                _KeptOutputs(layers) as kept:
            post = _HeadTargets(layers, hooks, kept,
                                _LayerSums(layers, self.seeds, config.needs_row_fisher))
            for layer in layers.values():
                layer.weight.requires_grad_(self.weight_grads)
            for b in tqdm(range(self.grad_batches), desc="head", unit="batch"):
                batch = as_calibration(self.batches[b])
                hooks.new_batch()
                loss, vectors = self.head_batch(self.acts(top, b),
                                                batch.targets.to(sm.device), draws, post)
                total += loss
                count += batch.predicted
                save_tensors(work.file("grads", top, b), vectors or {"none": torch.zeros(1)})
            if self.seeds:
                for _ in range(self.idle_steps):
                    distributed.lockstep(None, draws)
            for layer in layers.values():
                layer.weight.requires_grad_(False)
            total, count = distributed.sum_numbers(total, count)
            if layers:
                self._store_post(post, count)
        logger.info("calibration loss of the original model: %.4f", total / max(count, 1))
        work.commit(head=1, loss_tokens=count)
        work.drop("acts", top)

    def _store_post(self, post: _HeadTargets, tokens: int) -> None:
        """Decomposes and stores the targets after the blocks (the LM head, loaded) from
        what the head pass gathered, their input statistics completed on the batches
        outside the gradients."""
        if post.hooks.layers:
            self._head_forward(range(self.grad_batches, len(self.batches)), post.hooks)
            distributed.sum_moments(post.hooks.stats)
            _reached(post.hooks.stats)
        outputs, grads = post.sums.reduce(tokens, self.weight_grads)
        self._store_all(self.post, post.hooks.stats, outputs, grads)

    def head_pass(self, vectors: bool,
                  around: Callable[[], contextlib.AbstractContextManager] | None = None
                  ) -> tuple[float, dict[str, torch.Tensor]]:
        """The mean calibration loss of the gradient batches at the last block's outputs,
        the head loaded (no KL seeds: the correction stages' pass).

        Args:
            vectors: also write each batch's loss gradient there (grads/<top>/<b>).
            around: a context entered once the head is loaded; it yields {name: dense
                layer} inside the head whose ∂L/∂W is wanted (with ``vectors``), and may
                change the head's modules (and put them back on exit).

        Returns:
            (the mean loss, {name: ∂L/∂W of the layers ``around`` yielded}).
        """
        sm, work = self.sm, self.work
        top = len(sm.blocks)
        total, count = 0.0, 0
        with sm.parts(sm.outside(skip_head=False)), \
                (around() if around else contextlib.nullcontext({})) as layers, \
                InputMomentHooks({}) as hooks, _KeptOutputs(layers) as kept:
            post = _HeadTargets(layers, hooks, kept, _LayerSums(layers, 0, False))
            for layer in layers.values():
                layer.weight.requires_grad_(True)
            for b in range(self.grad_batches):
                batch = as_calibration(self.batches[b])
                targets, hidden = batch.targets.to(sm.device), self.acts(top, b)
                if vectors:
                    loss, found = self.head_batch(hidden, targets, None, post)
                    save_tensors(work.file("grads", top, b), found)
                else:
                    with torch.no_grad():
                        loss = sum(sample_loss(head_logits(sm, hidden[i:i + 1])[:, :-1],
                                               targets[i]).item()
                                   for i in range(hidden.shape[0]))
                total += loss
                count += batch.predicted
            for layer in layers.values():
                layer.weight.requires_grad_(False)
            total, count = distributed.sum_numbers(total, count)
            grads = post.sums.reduce(count, True)[1] if layers else {}
        work.drop("acts", top)
        if vectors:
            work.progress["loss_tokens"] = count
        return total / max(count, 1), grads

    def head_batch(self, hidden: torch.Tensor, targets: torch.Tensor, draws,
                   post: _HeadTargets | None = None) -> tuple[float, dict[str, torch.Tensor]]:
        """The summed loss of one batch and the vectors it seeds at the last block's output:
        the loss gradient (of the ``targets`` tokens, ``IGNORE`` where none is predicted)
        and the KL pseudo-gradients; with ``post``, also what its layers (targets inside
        the head) gather: input statistics, the batch's weight gradients, the metric. The
        head runs one sample at a time (a batch's logits are a run's largest tensors). The
        KL draws come in the order of a whole-batch draw: sample by sample in one process
        (the CPU generator gives the same numbers in pieces), for the whole batch first
        under torch.distributed, where every process replays every batch's draws in
        global batch order."""
        sm, config = self.sm, self.config
        layers = post.layers if post is not None else {}
        weights = [layer.weight for layer in layers.values()] if self.weight_grads else []
        samples = range(hidden.shape[0])
        drawn = None
        if self.seeds and distributed.world()[1] > 1:
            with torch.no_grad(), _paused(post):
                probs = torch.cat([fisher.top_k_probs(head_logits(sm, hidden[i:i + 1])[:, :-1],
                                                      config.top_k)[0] for i in samples])
            drawn = distributed.lockstep(probs, draws)
        total, vectors, batch_grads = 0.0, {}, {}
        for i in samples:
            h = hidden[i:i + 1].requires_grad_(True)
            with torch.enable_grad():
                logits = head_logits(sm, h)[:, :-1]
                loss = sample_loss(logits, targets[i])
                if self.weight_grads:
                    got = torch.autograd.grad(loss, [h, *weights], retain_graph=True)
                    vectors.setdefault("loss", []).append(got[0])
                    for name, g in zip(layers, got[1:], strict=True):
                        batch_grads[name] = g if name not in batch_grads else batch_grads[name] + g
                counted = (targets[i] != IGNORE)[None, :, None]  # unpredicted: no KL term
                for k, seed in enumerate(self._seeds(logits.detach(), drawn, i, draws)):
                    seed = seed.to(logits.device) * counted.to(logits.device, seed.dtype)
                    outs = [post.kept.outputs[n] for n in layers]
                    got = torch.autograd.grad(logits, [h, *outs], seed.to(logits.dtype),
                                              retain_graph=True)
                    vectors.setdefault(f"seed{k}", []).append(got[0])
                    for name, g in zip(layers, got[1:], strict=True):
                        post.sums.add_output_gradient(name, g, new_tokens=k == 0)
                if post is not None:
                    post.kept.outputs.clear()
            total += loss.item()
        for name, g in batch_grads.items():
            post.sums.add_batch_gradient(name, g)
        return total, {key: torch.cat(parts) for key, parts in vectors.items()}

    def _seeds(self, logits: torch.Tensor, drawn: torch.Tensor | None, i: int, draws):
        """The KL pseudo-gradients of sample ``i``'s ``logits`` (none without an output
        metric), from the batch's ``drawn`` when given, else drawn now."""
        if not self.seeds:
            return ()
        probs, index = fisher.top_k_probs(logits, self.config.top_k)
        mine = drawn[i:i + 1] if drawn is not None else draws(probs)
        return fisher.seeds_from_draws(logits.shape, probs, index, mine, self.config.kl_mode)

    def backward_block(self, block: nn.Module, index: int, layers: dict[str, nn.Linear],
                       input_stats: bool = True, residual_metric: bool = False):
        """Recomputes ``block`` on the batches: with ``input_stats``, the input statistics of
        ``layers`` on all batches (when the method needs them); on gradient batches, the
        loss gradients of their weights, their output statistics (IO-SVD's metric or
        FWSVD's row Fisher) and the vectors handed to the block below. With
        ``residual_metric``, also writes the work file metric/<index>: IO-SVD's output
        metric on the block's output, Σ s sᵀ over the KL pseudo-gradients s arriving
        there, per token (d×d float64; the KL weight of block refinement).

        Returns:
            ({module: input moment}, {module: output statistics}, {module: G}).
        """
        work, config = self.work, self.config
        input_stats = input_stats and config.needs_input_stats
        acc = _LayerSums(layers, self.seeds, config.needs_row_fisher)
        residual = None  # the block metric's sums, made at the first gradient batch
        weights = [layer.weight for layer in layers.values()]
        for w in weights:
            w.requires_grad_(self.weight_grads)
        with InputMomentHooks(layers if input_stats else {}) as hooks, \
                _KeptOutputs(layers) as kept:
            for b in range(len(self.batches) if input_stats else self.grad_batches):
                hooks.new_batch()
                wanted = b < self.grad_batches
                hidden = self.acts(index, b).requires_grad_(wanted)
                with torch.set_grad_enabled(wanted):
                    out = self.run(block, index, b, hidden)
                if not wanted:
                    continue
                upstream = load_tensors(work.file("grads", index + 1, b), self.sm.device)
                for k in range(self.seeds if residual_metric else 0):
                    residual = residual or linalg.SecondMoment.zeros(
                        upstream["seed0"].shape[-1], self.sm.device)
                    residual.update(upstream[f"seed{k}"].double(), new_tokens=k == 0)
                below = {}
                if self.weight_grads:
                    got = torch.autograd.grad(out, [hidden, *weights], upstream["loss"],
                                              retain_graph=True)
                    below["loss"] = got[0]
                    for name, g in zip(layers, got[1:], strict=True):
                        acc.add_batch_gradient(name, g)
                for k in range(self.seeds):
                    outs = [kept.outputs[n] for n in layers]
                    got = torch.autograd.grad(out, [hidden, *outs], upstream[f"seed{k}"],
                                              retain_graph=True)
                    below[f"seed{k}"] = got[0]
                    for name, g in zip(layers, got[1:], strict=True):
                        acc.add_output_gradient(name, g, new_tokens=k == 0)
                kept.outputs.clear()
                save_tensors(work.file("grads", index, b), below or {"none": torch.zeros(1)})
        for w in weights:
            w.requires_grad_(False)
        if residual_metric:  # every process sums, those without a gradient batch too
            residual = residual or linalg.SecondMoment.zeros(self.acts(index, 0).shape[-1],
                                                             self.sm.device)
            distributed.sum_tensors(residual.tensors())
            save_tensors(work.file("metric", index),
                         {"g": residual.xx / max(1, work.progress["loss_tokens"])})
        distributed.sum_moments(hooks.stats)
        outputs, grads = acc.reduce(work.progress["loss_tokens"], self.weight_grads)
        return hooks.stats, outputs, grads

    def _pre_backward(self) -> None:
        """The targets before the blocks (a VLM's projector or vision tower): the first
        block's input is computed again with its graph, the vectors the block-wise backward
        left there (grads/0) are back-propagated through it, and the layers' loss
        gradients and output statistics are gathered; then they are decomposed and stored
        (their input statistics come from the capture). Batches that do not reach a layer
        (text-only batches for a vision layer) are skipped for it."""
        sm, work, config = self.sm, self.work, self.config
        layers = {name: self.targets[name] for name in self.pre}
        with sm.parts(sm.outside(skip_head=True)), _KeptOutputs(layers) as kept:
            acc = _LayerSums(layers, self.seeds, config.needs_row_fisher)  # on their device
            weights = [layer.weight for layer in layers.values()]
            for w in weights:
                w.requires_grad_(True)
            for b in tqdm(range(self.grad_batches), desc="before the blocks", unit="batch"):
                upstream = load_tensors(work.file("grads", 0, b), sm.device)
                with torch.enable_grad():
                    (hidden, _), = capture_block_inputs(sm.model, sm.blocks, [self.batches[b]],
                                                        keep_graph=True)
                if not hidden.requires_grad:  # no target ran on this batch
                    continue
                if self.weight_grads:
                    got = torch.autograd.grad(hidden, weights, upstream["loss"],
                                              retain_graph=True, allow_unused=True)
                    for name, g in zip(layers, got, strict=True):
                        if g is not None:
                            acc.add_batch_gradient(name, g)
                reached = [name for name in layers if name in kept.outputs]
                for k in range(self.seeds if reached else 0):
                    got = torch.autograd.grad(hidden, [kept.outputs[n] for n in reached],
                                              upstream[f"seed{k}"], retain_graph=True,
                                              allow_unused=True)
                    for name, g in zip(reached, got, strict=True):
                        if g is None:  # e.g. a vision layer after the one the model reads
                            raise CalibrationError(f"the output of {name} does not reach "
                                                   "the logits")
                        acc.add_output_gradient(name, g, new_tokens=k == 0)
                kept.outputs.clear()
            for w in weights:
                w.requires_grad_(False)
            outputs, grads = acc.reduce(work.progress["loss_tokens"], self.weight_grads)
            self._store_all(self.pre, self.pre_stats, outputs, grads)

    def select(self, rank_map: dict | None) -> tuple[dict, dict]:
        """Ranks (and int8 row plans) from the stored sigmas and scores, or ``rank_map``."""
        config = self.config
        shapes = {n: tuple(t.weight.shape) for n, t in self.targets.items()}
        remap = getattr(config, "remap", None)
        if rank_map is not None:
            ranks = dict(rank_map)
        elif config.allocation == "uniform":
            ranks = uniform_ranks(shapes, config.ratio)
        elif config.allocation == "truncation-loss":
            stored = self._stored_meta(shapes, scores=False)
            ranks = loss_balanced_ranks(shapes, {n: s[0] for n, s in stored.items()},
                                        config.ratio, round(float(stored[next(iter(stored))][1])))
        else:
            stored = self._stored_meta(shapes, scores=True)
            ranks = global_select(shapes, {n: s[1] for n, s in stored.items()},
                                  config.ratio, config.rule, config.min_rank,
                                  cost=classic_cost if remap else kept_params).ranks
        if remap == "classic":
            plans = {n: classic_plan(*shapes[n], r) for n, r in ranks.items() if r is not None}
        elif remap == "loss-aware":
            budget = (1.0 - config.ratio) * sum(2 * m * n for m, n in shapes.values())
            plans = loss_aware_plans(shapes, ranks, self._row_changes(ranks), budget)
        else:
            plans = {}
        return ranks, plans

    def _row_changes(self, ranks: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{factorized target: (u row changes, v row changes)} at its rank, from the
        process that stored it."""
        held = {}
        for names in self.by_block.values():
            for name in distributed.mine(names):
                if ranks[name] is not None:
                    meta = StoredFactors.read_meta(self.work, name)
                    held[name] = [meta["u_changes"][:ranks[name]],
                                  meta["v_changes"][:ranks[name]]]
        held = distributed.share(held, {n: [(r,)] * 2 for n, r in ranks.items()
                                        if r is not None})
        return {name: tuple(value) for name, value in held.items()}

    def _stored_meta(self, shapes: dict, scores: bool) -> dict[str, list[torch.Tensor]]:
        """{target: [σ, scores or the token count]} from the process that stored it."""
        held = {}
        for names in self.by_block.values():
            for name in distributed.mine(names):
                meta = StoredFactors.read_meta(self.work, name)
                last = meta["scores"] if scores else torch.tensor([float(meta["tokens"])])
                held[name] = [meta["sigma"], last]
        return distributed.share(held, {n: [(min(m, k),), (min(m, k),) if scores else (1,)]
                                        for n, (m, k) in shapes.items()})


def _reached(stats: dict[str, linalg.SecondMoment]) -> dict[str, linalg.SecondMoment]:
    """Returns ``stats`` once every layer has seen a token.

    Raises:
        CalibrationError: no calibration sample reaches one of the layers (e.g. a vision
            layer without image samples, or a module the model never runs).
    """
    unseen = [name for name, stat in stats.items() if stat.count == 0]
    if unseen:
        raise CalibrationError(f"no calibration sample reaches {unseen[0]}: a vision-side "
                               "module needs image samples (--calib-images), and a module "
                               "the model never runs (e.g. an unused pooling head) must be "
                               "left out with --exclude")
    return stats


def _last_use(stats: dict[str, linalg.SecondMoment], name: str
              ) -> linalg.SecondMoment | None:
    """Pops ``name``'s statistics; when no other module shares them they are marked
    consumable, so that their mean is computed in place of the sums."""
    moment = stats.pop(name, None)
    if moment is not None and not any(other is moment for other in stats.values()):
        moment.consumable = True
    return moment


@dataclass
class _HeadTargets:
    """The targets inside the head (the LM head) during the head pass: their input hooks,
    kept outputs and backward sums."""

    layers: dict[str, nn.Linear]
    hooks: InputMomentHooks
    kept: _KeptOutputs
    sums: _LayerSums


@contextlib.contextmanager
def _paused(post: _HeadTargets | None):
    """Pauses ``post``'s input hooks (a pass that must not count)."""
    if post is None:
        yield
        return
    post.hooks.active = False
    try:
        yield
    finally:
        post.hooks.active = True


class _LayerSums:
    """What a backward pass sums per layer: the loss gradients G (float32, on the CPU),
    FWSVD's row Fisher Σ_b Σ_j (∂L_b/∂W_ij)² (when ``row_fisher``) and IO-SVD's output
    metric (when there are KL ``seeds``)."""

    def __init__(self, layers: dict[str, nn.Linear], seeds: int, row_fisher: bool) -> None:
        self.shapes = {n: layer.weight.shape for n, layer in layers.items()}
        self.sums: dict[str, torch.Tensor] = {}  # allocated by the first gradient
        self.metric = {n: linalg.SecondMoment.zeros(layer.out_features, layer.weight.device)
                       for n, layer in layers.items()} if seeds else {}
        self.rows = {n: torch.zeros(layer.out_features, dtype=torch.float64)
                     for n, layer in layers.items()} if row_fisher else {}

    def add_batch_gradient(self, name: str, grad: torch.Tensor) -> None:
        """Adds one batch's ∂L_b/∂W of layer ``name``."""
        grad = grad.float().cpu()
        if name in self.sums:
            self.sums[name] += grad
        else:
            self.sums[name] = grad.clone()
        if self.rows:
            self.rows[name] += grad.double().square().sum(1)

    def add_output_gradient(self, name: str, grad: torch.Tensor, new_tokens: bool) -> None:
        """Adds one KL pseudo-gradient at layer ``name``'s output to its metric."""
        if not torch.isfinite(grad).all():
            raise CalibrationError(f"non-finite KL pseudo-gradient at {name}")
        self.metric[name].update(grad, new_tokens=new_tokens)

    def reduce(self, tokens: int, weight_grads: bool
               ) -> tuple[dict[str, linalg.SecondMoment | torch.Tensor], dict]:
        """Sums over processes; returns ({layer: row Fisher or metric}, {layer: G = sum /
        ``tokens``}, empty without ``weight_grads``)."""
        distributed.sum_moments(self.metric)
        grads = {}
        if weight_grads:  # a layer no batch reached sums zeros (every rank sends all)
            grads = {n: self.sums.get(n, torch.zeros(shape)) for n, shape in self.shapes.items()}
        distributed.sum_tensors([*grads.values(), *self.rows.values()])
        grads = {n: s / tokens for n, s in grads.items()}
        return self.rows or self.metric, grads


class _KeptOutputs:
    """Forward hooks that keep each layer's latest output (for the output metric)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers, self.outputs, self._handles = layers, {}, []

    def __enter__(self) -> _KeptOutputs:
        def keep(name):
            def hook(module, args, output):
                if output.requires_grad:
                    self.outputs[name] = output
            return hook

        self._handles = [layer.register_forward_hook(keep(name))
                         for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        self.outputs.clear()
        for handle in self._handles:
            handle.remove()


@dataclass
class StoredFactors:
    """A decomposition as stored in the work folder: its factors at full rank (float32),
    ready to be cut, and its singular values. Duck-types ``linalg.Decomposition`` for
    ``_cut``."""

    w_u: torch.Tensor
    w_v: torch.Tensor
    sigma: torch.Tensor

    def truncation_loss(self, rank: int) -> float:
        return float(self.sigma[rank:].square().sum())

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_u[:, :rank], self.w_v[:rank]

    @staticmethod
    def save(work: WorkFolder, name: str, decomposition: linalg.Decomposition,
             extra: dict[str, torch.Tensor], tokens: int) -> None:
        """Writes the full-rank factors, σ, the token count and ``extra`` (component
        ``scores``, int8 row ``u_changes`` / ``v_changes``)."""
        w_u, w_v = decomposition.factors(decomposition.sigma.numel())
        tensors = {"w_u": w_u.float(), "w_v": w_v.float(), "sigma": decomposition.sigma,
                   "tokens": torch.tensor([tokens]), **extra}
        save_tensors(work.file("factors", name), tensors)

    @classmethod
    def load(cls, work: WorkFolder, name: str) -> StoredFactors:
        t = load_tensors(work.file("factors", name))
        return cls(t["w_u"].double(), t["w_v"].double(), t["sigma"])

    @staticmethod
    def read_meta(work: WorkFolder, name: str) -> dict:
        with safe_open(work.file("factors", name), framework="pt") as f:
            keys = set(f.keys())
            meta = {key: f.get_tensor(key) if key in keys else None
                    for key in ("sigma", "scores", "u_changes", "v_changes")}
            return {**meta, "tokens": int(f.get_tensor("tokens")[0])}




def save_whitening(work: WorkFolder, name: str, input_whitening: linalg.Whitening | None,
                   output_whitening: linalg.Whitening | None) -> None:
    """Keeps the whitening roots S and T of ``name``'s decomposition (float64) for the
    correction stages, which re-cut corrected weights in the same basis, and T for the
    anchored re-cut in the output metric."""
    tensors = {}
    for side, whitening in (("s", input_whitening), ("t", output_whitening)):
        if whitening is not None:
            tensors[f"{side}_root"] = whitening.root
            tensors[f"{side}_kind"] = torch.tensor([WHITENING_KINDS.index(whitening.kind)])
            tensors[f"{side}_damping"] = torch.tensor([whitening.damping], dtype=torch.float64)
            if whitening.inverse is not None:
                tensors[f"{side}_inverse"] = whitening.inverse
    save_tensors(work.file("whitening", name), tensors or {"none": torch.zeros(1)})


def load_whitening(work: WorkFolder, name: str
                   ) -> tuple[linalg.Whitening | None, linalg.Whitening | None]:
    """(S, T) as :func:`save_whitening` kept them (None for an unwhitened side)."""
    tensors = load_tensors(work.file("whitening", name))
    sides = []
    for side in ("s", "t"):
        if f"{side}_root" not in tensors:
            sides.append(None)
            continue
        sides.append(linalg.Whitening(
            root=tensors[f"{side}_root"],
            kind=WHITENING_KINDS[int(tensors[f"{side}_kind"][0])],
            damping=float(tensors[f"{side}_damping"][0]),
            inverse=tensors.get(f"{side}_inverse")))
    return sides[0], sides[1]


#: ``Whitening.kind`` values, indexed as :func:`save_whitening` stores them.
WHITENING_KINDS = ("cholesky", "eigen")
