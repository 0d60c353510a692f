"""Calibration-loss gradients ∂L/∂W of target layers (whole-model backward).

L is the mean next-token cross-entropy over every predicted calibration token. Gradients
are accumulated as (sum, count) in float32 on the CPU as each batch is produced; in a
distributed run (``rankcut.distributed``) each rank takes its share of the batches and the
sums and counts are all-reduced before the division.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .data import IGNORE, Calibration, as_calibration
from .errors import CalibrationError
from .hooks import InputMomentHooks, OutputMetricHooks
from .models import find_decoder_blocks

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _only_targets_require_grad(model: nn.Module, layers: dict[str, nn.Linear]):
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            layer.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


def checkpointing_needed(model: nn.Module, batch_tokens: int, budget: float = 0.25) -> bool:
    """Whether a backward pass should recompute blocks instead of storing their activations.

    Estimates the activations a plain backward stores (per block and token: about six
    hidden-size and four intermediate-size float32 vectors) and says yes when they exceed
    ``budget`` of the device's memory (total RAM on the CPU).
    """
    config = model.config.get_text_config()
    hidden = getattr(config, "hidden_size", 0)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * hidden)
    _, blocks = find_decoder_blocks(model)
    stored = len(blocks) * batch_tokens * (6 * hidden + 4 * inner) * 4
    device = next(model.parameters()).device
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return stored > budget * memory


@contextlib.contextmanager
def _block_checkpointing(model: nn.Module, enabled: bool):
    """Recomputes each decoder block in the backward pass (transformers' gradient
    checkpointing) when ``enabled``, without putting dropout or any other sub-module in
    training mode."""
    if not enabled or not getattr(model, "supports_gradient_checkpointing", False):
        yield
        return
    _, blocks = find_decoder_blocks(model)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    try:
        for block in blocks:
            block.training = True  # the flag alone: children stay in eval mode
        yield
    finally:
        for block in blocks:
            block.training = False
        disable()


def _batch_loss_and_logits(model: nn.Module, batch: Calibration):
    """Summed next-token cross-entropy of one batch over its predicted tokens, and the
    logits of every position but the last."""
    parameter = next(model.parameters())
    inputs = batch.model_inputs(parameter.device, parameter.dtype)
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    loss = F.cross_entropy(logits.flatten(0, 1).float(),
                           batch.targets.to(parameter.device).flatten(),
                           ignore_index=IGNORE, reduction="sum")
    if not torch.isfinite(loss):
        raise CalibrationError("calibration loss is not finite; the model produced NaN/inf")
    return loss, logits


def calibration_gradients(
    model: nn.Module, layers: dict[str, nn.Linear], ids: torch.Tensor | Calibration,
    batch_size: int = 4,
    input_hooks: InputMomentHooks | None = None, checkpointing: bool | None = None,
    output_hooks: OutputMetricHooks | None = None,
    fisher_rows: dict[str, torch.Tensor] | None = None,
    weight_grads: bool = True,
) -> tuple[dict[str, torch.Tensor], float]:
    """Returns G = ∂L/∂W for each layer's weight (float32, CPU) and the loss L itself.

    Side effects: none that outlive the call (requires_grad flags, gradient buffers and
    checkpointing are restored), except that ``input_hooks`` accumulate the layers' input
    statistics of the forward passes (not of checkpoint recomputation) and ``output_hooks``
    the layers' KL output metric (extra backward passes from the same forward).

    In a distributed run this is a collective: every rank passes all the ids and runs its
    share of the batches (``distributed.my_batches``); the gradients, the loss,
    ``fisher_rows`` and the hooks' statistics are summed over ranks before returning, so
    the hooks and ``fisher_rows`` must hold only what this call accumulates.

    Args:
        model: a causal LM in eval mode.
        layers: {name: nn.Linear} whose weight gradients are wanted.
        ids: [num_samples, seqlen] calibration token ids, or a ``Calibration`` (image
            samples: the loss counts only their labelled tokens).
        batch_size: samples per forward/backward pass.
        input_hooks: entered ``InputMomentHooks`` to feed during the forward passes.
        checkpointing: recompute blocks in the backward pass; None decides by
            ``checkpointing_needed``.
        output_hooks: entered ``OutputMetricHooks`` fed after each batch's backward pass.
        fisher_rows: when given, {name: float64 vector of m zeros} that receives, per batch,
            the row sums of the squared batch gradient Σ_j (∂L_b/∂W_ij)² (FWSVD's Fisher
            diagonal summed over each output row). Mutated.
        weight_grads: False skips the loss backward pass (only the hooks' statistics and
            the loss are wanted); the returned gradient dict is then empty.
    """
    ids = as_calibration(ids)
    sums = {name: torch.zeros(layer.weight.shape, dtype=torch.float32)
            for name, layer in layers.items() if weight_grads}
    total, count = 0.0, 0
    if checkpointing is None:
        checkpointing = checkpointing_needed(model, batch_size * ids.shape[1])
    logger.info("gradients: %d samples, activation checkpointing %s", ids.shape[0],
                "on" if checkpointing else "off")
    batches = distributed.my_batches(ids, batch_size)
    with _only_targets_require_grad(model, layers), _block_checkpointing(model, checkpointing):
        for batch in tqdm(batches, desc="gradients", unit="batch"):
            if input_hooks is not None:
                input_hooks.new_batch()
                input_hooks.active = True
            if output_hooks is not None:
                output_hooks.active = True
            loss, logits = _batch_loss_and_logits(model, batch)
            for hooks in (input_hooks, output_hooks):
                if hooks is not None:
                    hooks.active = False
            if weight_grads and loss.requires_grad:  # False: no target ran on this batch
                loss.backward(retain_graph=output_hooks is not None)
            if output_hooks is not None:
                output_hooks.accumulate(logits, batch.targets != IGNORE)
            del logits
            total += loss.item()
            count += batch.predicted
            if not weight_grads:
                continue
            for name, layer in layers.items():
                if layer.weight.grad is None:  # not reached by this batch (a vision layer)
                    continue
                grad = layer.weight.grad.float().cpu()
                sums[name] += grad
                if fisher_rows is not None:
                    fisher_rows[name] += grad.double().square().sum(1)
                layer.weight.grad = None
    if output_hooks is not None:  # a rank with fewer batches takes part in every draw step
        for _ in range(distributed.idle_steps(len(ids.split(batch_size)))):
            output_hooks.skip()
    total, count = _sum_over_ranks(sums, fisher_rows, (input_hooks, output_hooks), total, count)
    return {name: s / count for name, s in sums.items() if weight_grads}, total / count


def _sum_over_ranks(sums, fisher_rows, hooks, total, count) -> tuple[float, int]:
    """Sums the gradient sums, ``fisher_rows`` and the hooks' statistics over ranks in
    place; returns the loss total and token count summed (all unchanged in one process)."""
    distributed.sum_tensors([*sums.values(), *(fisher_rows or {}).values()])
    for hook in hooks:
        if hook is not None:
            distributed.sum_moments(hook.stats)
    return distributed.sum_numbers(total, count)


def calibration_loss(model: nn.Module, ids: torch.Tensor | Calibration,
                     batch_size: int = 4) -> float:
    """Returns the mean next-token cross-entropy of ``model`` on calibration ids or a
    ``Calibration`` (in a distributed run a collective: each rank runs its share of the
    batches)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in distributed.my_batches(as_calibration(ids), batch_size):
            total += _batch_loss_and_logits(model, batch)[0].item()
            count += batch.predicted
    total, count = distributed.sum_numbers(total, count)
    return total / count
