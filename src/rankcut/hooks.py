"""Forward hooks that accumulate the input statistics of linear layers."""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import distributed, fisher, linalg
from .errors import CalibrationError

logger = logging.getLogger(__name__)


class InputMomentHooks:
    """Accumulates each layer's input second moment while the hooks are active.

    Layers fed the very same input tensor in one forward pass (q/k/v, gate/up) share one
    accumulator, so each distinct input is accumulated once. Use as a context manager;
    call ``new_batch()`` before each forward pass and ``pause()`` around passes that must
    not count (for example the recomputation of activation checkpointing).

    Attributes:
        stats: {layer name: SecondMoment}; entries of layers that share an input end up as
            the same object.
    """

    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        self.layers = layers
        self.stats = {name: linalg.SecondMoment.zeros(layer.in_features,
                                                         layer.weight.device)
                      for name, layer in layers.items()}
        self.active = True
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles: list = []

    def __enter__(self) -> InputMomentHooks:
        self._handles = [layer.register_forward_hook(self._hook(name))
                         for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        self._seen.clear()
        for handle in self._handles:
            handle.remove()

    def new_batch(self) -> None:
        """Forgets which tensors were seen (call before each forward pass)."""
        self._seen.clear()

    def _hook(self, name: str):
        def hook(module, args, output):
            if not self.active:
                return
            x = args[0].detach()
            first = self._seen.get(id(args[0]))
            if first is not None and first[0] is args[0]:
                self.stats[name] = self.stats[first[1]]
                return
            if not torch.isfinite(x).all():
                raise CalibrationError(f"non-finite (NaN/inf) activations at the input of {name}")
            self._seen[id(args[0])] = (args[0], name)
            self.stats[name].update(x)

        return hook


class OutputMetricHooks:
    """Accumulates each layer's output metric C = (1/N) Σ_t Σ_k b b_ᵀ of IO-SVD.

    While active, forward hooks keep each layer's output tensor; ``accumulate(logits)``
    then back-propagates the KL pseudo-gradients (``fisher.kl_seeds``) from the logits to
    those outputs (``torch.autograd.grad``: no weight gradient is computed) and adds the
    outer products of the results, in float64. Use as a context manager.

    In a distributed run the random draws follow global batch order: each ``accumulate``
    (and each ``skip`` of a rank without a batch at that step) is a collective that replays
    the draws of every rank's batch, so the draws equal those of one process.

    Attributes:
        stats: {layer name: SecondMoment over the layer's output dimension}.
    """

    def __init__(self, layers: dict[str, nn.Linear], top_k: int, mode: str, seed: int = 0
                 ) -> None:
        self.layers = layers
        self.top_k, self.mode = top_k, mode
        if top_k == 1 and layers:
            logger.warning("top_k=1: the top-1 renormalized distribution is a point mass with "
                           "zero Fisher, so the output metric carries no information")
        self.stats = {name: linalg.SecondMoment.zeros(layer.out_features,
                                                         layer.weight.device)
                      for name, layer in layers.items()}
        self.active = False
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same draws on any device
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> OutputMetricHooks:
        self._handles = [layer.register_forward_hook(self._hook(name))
                         for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        self._outputs.clear()
        for handle in self._handles:
            handle.remove()

    def _hook(self, name: str):
        def hook(module, args, output):
            if self.active:
                self._outputs[name] = output

        return hook

    def accumulate(self, logits: torch.Tensor, predicted: torch.Tensor | None = None) -> None:
        """Back-propagates the seeds of ``logits`` (still attached to the graph of the last
        active forward pass) to every kept output and adds their outer products. Frees the
        kept outputs.

        Args:
            logits: [batch, positions, vocabulary], attached to the graph.
            predicted: [batch, positions] bool, False where a position's distribution does
                not count (the prompt of an image sample); None: every position counts.

        Raises:
            CalibrationError: a layer's output did not reach the logits, or a
                back-propagated vector is not finite.
        """
        names = list(self._outputs)
        outputs = [self._outputs[name] for name in names]
        if predicted is not None and bool(predicted.all()):
            predicted = None
        try:
            seeds = fisher.kl_seeds(logits, self.top_k, self.mode, draw=self._draw)
            for k, seed in enumerate(seeds):
                if not outputs:  # no kept layer ran on this batch (the draws still advance)
                    continue
                if predicted is not None:
                    seed = seed * predicted.to(seed.device, seed.dtype)[..., None]
                grads = torch.autograd.grad(logits, outputs, seed.to(logits.dtype),
                                            retain_graph=True, allow_unused=True)
                for name, grad in zip(names, grads, strict=True):
                    if grad is None:
                        raise CalibrationError(f"the output of {name} does not reach the logits")
                    if not torch.isfinite(grad).all():
                        raise CalibrationError(f"non-finite KL pseudo-gradient at {name}")
                    self.stats[name].update(grad, new_tokens=k == 0)
        finally:
            self._outputs.clear()

    def skip(self) -> None:
        """Takes part in one step of draws without a batch of its own (a rank with fewer
        batches than the others in a distributed run); advances the generator like them."""
        distributed.lockstep(None, self._draws)

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        return distributed.lockstep(probs, self._draws)

    def _draws(self, probs: torch.Tensor) -> torch.Tensor:
        return fisher.kl_draws(probs, self.mode, self.generator)
