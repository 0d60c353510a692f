"""The low-rank linear layer that replaces ``nn.Linear`` in a compressed model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    """``y = W_u (W_v x) + b`` with W_u of shape [out, rank] and W_v of shape [rank, in].

    Its state dict holds ``weight_u``, ``weight_v`` and (when present) ``bias``: the names
    the rankcut checkpoint format uses, so the module serializes itself.

    Args:
        in_features: input dimension n.
        out_features: output dimension m.
        rank: inner dimension r.
        bias: whether the layer has an output bias.
        device: where the parameters are created (``"meta"`` when rebuilt before loading).
        dtype: parameter dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        kw = {"device": device, "dtype": dtype}
        self.weight_u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.weight_v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(
        cls,
        weight_u: torch.Tensor,
        weight_v: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankLinear:
        """Builds the layer from factors (copied and cast to ``dtype``, default W_u's)."""
        dtype = dtype or weight_u.dtype
        out_features, rank = weight_u.shape
        layer = cls(weight_v.shape[1], out_features, rank, bias is not None,
                    device=weight_u.device, dtype=dtype)
        with torch.no_grad():
            layer.weight_u.copy_(weight_u)
            layer.weight_v.copy_(weight_v)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two GEMMs: the thin projection to rank r first, then back up to out_features."""
        return F.linear(F.linear(x, self.weight_v), self.weight_u, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """Returns the product W_u W_v, shape [out, in], in the parameters' dtype."""
        return self.weight_u @ self.weight_v

    def to_dense(self) -> nn.Linear:
        """Returns an equivalent ``nn.Linear`` holding W_u W_v (and the bias)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight_u.device, dtype=self.weight_u.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")
