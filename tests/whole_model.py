"""A whole-model reference for the block-wise engine's statistics (tests and
``benchmarks/kl_cost.py`` only; ``rankcut`` itself never runs a whole-model backward).

``calibration_gradients`` gives G = ∂L/∂W of target layers (L the mean next-token
cross-entropy over the predicted calibration tokens) and feeds input-moment and KL
output-metric hooks on the way; ``calibration_loss`` gives L alone. One process only.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from rankcut.calibration.data import IGNORE, Calibration, as_calibration
from rankcut.calibration.hooks import InputMomentHooks
from rankcut.core import fisher, linalg
from rankcut.errors import CalibrationError


class OutputMetricHooks:
    """Accumulates each layer's output metric C = Σ_t Σ_k b bᵀ of IO-SVD (a whole-model
    version of what the engine's block-wise backward sums).

    While active, forward hooks keep each layer's output; ``accumulate(logits)`` then
    back-propagates the KL pseudo-gradients (``fisher.kl_seeds``) from the logits to those
    outputs and adds their outer products in float64. Use as a context manager.

    Attributes:
        stats: {layer name: SecondMoment over the layer's output dimension}.
    """

    def __init__(self, layers: dict[str, nn.Linear], top_k: int, mode: str, seed: int = 0
                 ) -> None:
        self.layers, self.top_k, self.mode = layers, top_k, mode
        self.stats = {name: linalg.SecondMoment.zeros(layer.out_features)
                      for name, layer in layers.items()}
        self.active = False
        self.generator = torch.Generator().manual_seed(seed)
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> OutputMetricHooks:
        def keep(name):
            def hook(module, args, output):
                if self.active:
                    self._outputs[name] = output
            return hook

        self._handles = [layer.register_forward_hook(keep(name))
                         for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        self._outputs.clear()
        for handle in self._handles:
            handle.remove()

    def accumulate(self, logits: torch.Tensor, predicted: torch.Tensor | None = None) -> None:
        """Back-propagates the seeds of ``logits`` to every kept output and adds their outer
        products (``predicted``: False where a position does not count). Frees the outputs."""
        names = list(self._outputs)
        outputs = [self._outputs[name] for name in names]
        try:
            seeds = fisher.kl_seeds(logits, self.top_k, self.mode, self.generator)
            for k, seed in enumerate(seeds):
                if not outputs:
                    continue
                if predicted is not None:
                    seed = seed * predicted.to(seed.device, seed.dtype)[..., None]
                grads = torch.autograd.grad(logits, outputs, seed.to(logits.dtype),
                                            retain_graph=True, allow_unused=True)
                for name, grad in zip(names, grads, strict=True):
                    if grad is None:
                        raise CalibrationError(f"the output of {name} does not reach the logits")
                    self.stats[name].update(grad, new_tokens=k == 0)
        finally:
            self._outputs.clear()


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


def _batch_loss_and_logits(model: nn.Module, batch: Calibration):
    """Summed next-token cross-entropy of one batch over its predicted tokens, and the
    logits of every position but the last."""
    parameter = next(model.parameters())
    inputs = batch.model_inputs(parameter.device, parameter.dtype)
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    loss = F.cross_entropy(logits.flatten(0, 1).float(),
                           batch.targets.to(parameter.device).flatten(),
                           ignore_index=IGNORE, reduction="sum")
    return loss, logits


def calibration_gradients(
    model: nn.Module, layers: dict[str, nn.Linear], ids: torch.Tensor | Calibration,
    batch_size: int = 4,
    input_hooks: InputMomentHooks | None = None,
    output_hooks: OutputMetricHooks | None = None,
    fisher_rows: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Returns G = ∂L/∂W for each layer's weight (float32, CPU) and the loss L itself.

    Side effects: ``input_hooks`` / ``output_hooks`` accumulate the layers' input moments /
    KL output metric; ``fisher_rows`` ({name: float64 zeros of length m}) receives each
    batch's Σ_j (∂L_b/∂W_ij)². The model's requires_grad flags and gradients are restored.
    """
    ids = as_calibration(ids)
    sums = {name: torch.zeros(layer.weight.shape) for name, layer in layers.items()}
    total, count = 0.0, 0
    with _only_targets_require_grad(model, layers):
        for batch in ids.split(batch_size):
            if input_hooks is not None:
                input_hooks.new_batch()
                input_hooks.active = True
            if output_hooks is not None:
                output_hooks.active = True
            loss, logits = _batch_loss_and_logits(model, batch)
            for hooks in (input_hooks, output_hooks):
                if hooks is not None:
                    hooks.active = False
            if loss.requires_grad:
                loss.backward(retain_graph=output_hooks is not None)
            if output_hooks is not None:
                output_hooks.accumulate(logits, batch.targets != IGNORE)
            total += loss.item()
            count += batch.predicted
            for name, layer in layers.items():
                if layer.weight.grad is None:  # not reached by this batch (a vision layer)
                    continue
                grad = layer.weight.grad.float().cpu()
                sums[name] += grad
                if fisher_rows is not None:
                    fisher_rows[name] += grad.double().square().sum(1)
                layer.weight.grad = None
    return {name: s / count for name, s in sums.items()}, total / count


def calibration_loss(model: nn.Module, ids: torch.Tensor | Calibration,
                     batch_size: int = 4) -> float:
    """The mean next-token cross-entropy of ``model`` on calibration ids or a Calibration."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in as_calibration(ids).split(batch_size):
            total += _batch_loss_and_logits(model, batch)[0].item()
            count += batch.predicted
    return total / count
