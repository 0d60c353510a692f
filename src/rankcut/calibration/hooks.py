"""Forward hooks that accumulate the input statistics of linear layers."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..core import linalg
from ..errors import CalibrationError

logger = logging.getLogger(__name__)


class InputMomentHooks:
    """Accumulates each layer's input second moment while the hooks are active.

    Layers fed the very same input tensor in one forward pass (q/k/v, gate/up) share one
    accumulator, so each distinct input is accumulated once. Use as a context manager;
    call ``new_batch()`` before each forward pass and ``pause()`` around passes that must
    not count.

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
