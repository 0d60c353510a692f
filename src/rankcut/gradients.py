"""Calibration-loss gradients ∂L/∂W of target layers (whole-model backward).

L is the mean next-token cross-entropy over every predicted calibration token. Gradients
are accumulated as (sum, count) in float32 on the CPU as each batch is produced, so they can
be all-reduced across processes later.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import CalibrationError
from .hooks import InputMomentHooks
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


@contextlib.contextmanager
def _block_checkpointing(model: nn.Module):
    """Recomputes each decoder block in the backward pass (transformers' gradient
    checkpointing), without putting dropout or any other sub-module in training mode."""
    if not getattr(model, "supports_gradient_checkpointing", False):
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


def _batch_loss_sum(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
    if not torch.isfinite(loss):
        raise CalibrationError("calibration loss is not finite; the model produced NaN/inf")
    return loss


def calibration_gradients(
    model: nn.Module, layers: dict[str, nn.Linear], ids: torch.Tensor, batch_size: int = 4,
    input_hooks: InputMomentHooks | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Returns G = ∂L/∂W for each layer's weight (float32, CPU) and the loss L itself.

    Side effects: none that outlive the call (requires_grad flags, gradient buffers and
    checkpointing are restored), except that active ``input_hooks`` accumulate the layers'
    input statistics of the forward passes (not of checkpoint recomputation).

    Args:
        model: a causal LM in eval mode.
        layers: {name: nn.Linear} whose weight gradients are wanted.
        ids: [num_samples, seqlen] calibration token ids.
        batch_size: samples per forward/backward pass.
        input_hooks: entered ``InputMomentHooks`` to feed during the forward passes.
    """
    device = next(model.parameters()).device
    sums = {name: torch.zeros(layer.weight.shape, dtype=torch.float32)
            for name, layer in layers.items()}
    total, count = 0.0, 0
    with _only_targets_require_grad(model, layers), _block_checkpointing(model):
        for batch in tqdm(ids.split(batch_size), desc="gradients", unit="batch"):
            batch = batch.to(device)
            if input_hooks is not None:
                input_hooks.new_batch()
                input_hooks.active = True
            loss = _batch_loss_sum(model, batch)
            if input_hooks is not None:
                input_hooks.active = False
            loss.backward()
            for name, layer in layers.items():
                sums[name] += layer.weight.grad.float().cpu()
                layer.weight.grad = None
            total += loss.item()
            count += batch[:, 1:].numel()
    return {name: s / count for name, s in sums.items()}, total / count


def calibration_loss(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Returns the mean next-token cross-entropy of ``model`` on calibration ids."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in ids.split(batch_size):
            batch = batch.to(device)
            total += _batch_loss_sum(model, batch).item()
            count += batch[:, 1:].numel()
    return total / count
