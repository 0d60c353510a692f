"""Decoder-block mechanics: capture the first block's inputs, replay blocks, hook stats.

Calibration runs one decoder block at a time: the inputs of the first block are captured
once (with the keyword arguments the model hands each block), then each block is run on
its inputs and its outputs become the next block's inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core import linalg
from .data import Calibration, as_calibration
from .hooks import InputMomentHooks


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


Batch = tuple[torch.Tensor, dict[int, dict]]


def kwarg_sources(model: nn.Module, count: int) -> list[int]:
    """For each decoder block, the first block of the same attention type.

    Models that mix attention types (Gemma 3's sliding and full layers, per
    ``config.layer_types``) hand each type its own mask and position embeddings; a block
    replays the keyword arguments captured at the first block of its type.
    """
    config = model.config.get_text_config() if hasattr(model, "config") else None
    types = getattr(config, "layer_types", None)
    if not types or len(types) != count:
        return [0] * count
    first: dict[str, int] = {}
    return [first.setdefault(kind, i) for i, kind in enumerate(types)]


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList,
                         batches: Sequence[torch.Tensor | Calibration],
                         keep_graph: bool = False) -> list[Batch]:
    """Runs the model up to the first decoder block and records that block's inputs.

    Args:
        model: the whole model (a vision-language model runs its vision side too).
        blocks: its decoder blocks.
        batches: token-id tensors or ``Calibration`` batches (with images).
        keep_graph: record the hidden states with their autograd graph (a backward pass
            through the embeddings and the vision side follows); only the first block's
            keyword arguments are then recorded.

    Returns:
        One (hidden_states, {source block: keyword arguments}) pair per batch. The keyword
        arguments (attention mask, position embeddings, ...) are the ones the model passed to
        the first block of each attention type (see ``kwarg_sources``); the forward pass
        stops once all of them are recorded.
    """
    sources = [0] if keep_graph else sorted(set(kwarg_sources(model, len(blocks))))
    captured: list[Batch] = []

    def make_hook(index: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs.pop("hidden_states", None)
            if index == 0:
                captured.append((hidden if keep_graph else hidden.detach(), {}))
            captured[-1][1][index] = kwargs
            if index == sources[-1]:
                raise _StopForward

        return hook

    parameter = next(model.parameters())
    handles = [blocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i in sources]
    try:
        with torch.set_grad_enabled(keep_graph and torch.is_grad_enabled()):
            for batch in batches:
                inputs = as_calibration(batch).model_inputs(parameter.device, parameter.dtype)
                try:
                    model(**inputs, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def run_block(block: nn.Module, inputs: list[Batch], source: int = 0) -> list[Batch]:
    """Runs one decoder block on every captured batch; returns the next block's inputs.

    Args:
        block: the decoder block.
        inputs: (hidden states, keyword arguments by source block) per batch.
        source: which captured keyword arguments this block replays.
    """
    outputs = []
    for hidden, kwargs in inputs:
        out = block(hidden, **kwargs[source])
        out = out[0] if isinstance(out, (tuple, list)) else out
        outputs.append((out, kwargs))
    return outputs


def accumulate_block_stats(block: nn.Module, names: list[str], targets: dict[str, nn.Linear],
                           inputs: list[Batch], source: int = 0
                           ) -> tuple[dict[str, linalg.SecondMoment], list]:
    """Runs a block with hooks that accumulate each target layer's input second moment.

    Returns:
        ({module name: statistics}, the block's outputs on every batch).

    Raises:
        CalibrationError: a target layer received NaN or infinite activations.
    """
    outputs = []
    with InputMomentHooks({name: targets[name] for name in names}) as hooks:
        for batch in inputs:
            hooks.new_batch()
            outputs.extend(run_block(block, [batch], source))
    return hooks.stats, outputs
