"""The low-rank linear layer that replaces ``nn.Linear`` in a compressed model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.hybrid import RowPlan, component_order, dequantize_rows, quantize_rows
from . import kernels

DEQUANTIZE_ONCE_TOKENS = 64  # from this many tokens per call, int8 factors are dequantized


class LowRankLinear(nn.Module):
    """``y = W_u (W_v x) + b`` with W_u of shape [out, rank] and W_v of shape [rank, in].

    Optionally hybrid: the output vectors of the first ``u_int8`` components (columns of
    W_u) and the input vectors of ``v_int8`` consecutive components from ``v_int8_start``
    (rows of W_v) are stored as int8 with one scale per vector; the rest in the layer's
    dtype. The forward pass dequantizes them on the fly (one extra [out, rank] / [rank, in]
    temporary per call).

    The state dict holds ``weight_u`` and ``weight_v`` (the non-int8 parts), ``bias`` when
    present, and for a hybrid layer ``weight_u_int8`` [u_int8, out], ``weight_u_scale``,
    ``weight_v_int8`` [v_int8, in] and ``weight_v_scale``: the names of the rankcut
    checkpoint format, so the module serializes itself.

    Args:
        in_features: input dimension n.
        out_features: output dimension m.
        rank: inner dimension r.
        bias: whether the layer has an output bias.
        device: where the tensors are created (``"meta"`` when rebuilt before loading).
        dtype: dtype of the non-int8 tensors and of the scales.
        u_int8: number of int8 output vectors (components 0 … u_int8 − 1).
        v_int8: number of int8 input vectors.
        v_int8_start: first component whose input vector is int8.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        u_int8: int = 0,
        v_int8: int = 0,
        v_int8_start: int = 0,
    ) -> None:
        super().__init__()
        if not (0 <= u_int8 <= rank and 0 <= v_int8 and 0 <= v_int8_start
                and v_int8_start + v_int8 <= rank):
            raise ValueError(f"int8 layout (u={u_int8}, v={v_int8} from {v_int8_start}) does "
                             f"not fit rank {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.u_int8, self.v_int8, self.v_int8_start = u_int8, v_int8, v_int8_start
        kw = {"device": device, "dtype": dtype}
        # [out, r] stored column-major (the transpose of a contiguous [r, out]): the up
        # projection then streams long contiguous rows, 10-25% faster at decode on the CPU
        self.weight_u = nn.Parameter(torch.empty(rank - u_int8, out_features, **kw).t())
        self.weight_v = nn.Parameter(torch.empty(rank - v_int8, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        if u_int8:
            self.register_buffer("weight_u_int8", torch.empty(u_int8, out_features,
                                                              dtype=torch.int8, device=device))
            self.register_buffer("weight_u_scale", torch.empty(u_int8, **kw))
        if v_int8:
            self.register_buffer("weight_v_int8", torch.empty(v_int8, in_features,
                                                              dtype=torch.int8, device=device))
            self.register_buffer("weight_v_scale", torch.empty(v_int8, **kw))

    @classmethod
    def from_factors(
        cls,
        weight_u: torch.Tensor,
        weight_v: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        plan: RowPlan | None = None,
    ) -> LowRankLinear:
        """Builds the layer from factors (copied and cast to ``dtype``, default W_u's).

        With a ``plan``, the components are reordered so its int8 rows are contiguous and
        those rows are quantized (symmetric absmax, one scale per row); W_u W_v is
        unchanged by the reordering.
        """
        dtype = dtype or weight_u.dtype
        out_features, rank = weight_u.shape
        u_count = v_count = v_start = 0
        if plan is not None:
            perm, u_count, v_start, v_count = component_order(plan)
            weight_u, weight_v = weight_u[:, perm], weight_v[perm]
        layer = cls(weight_v.shape[1], out_features, rank, bias is not None,
                    device=weight_u.device, dtype=dtype, u_int8=u_count, v_int8=v_count,
                    v_int8_start=v_start)
        v_int8 = torch.zeros(rank, dtype=torch.bool)
        v_int8[v_start:v_start + v_count] = True
        with torch.no_grad():
            layer.weight_u.copy_(weight_u[:, u_count:])
            layer.weight_v.copy_(weight_v[~v_int8.to(weight_v.device)])
            if u_count:
                values, scale = quantize_rows(weight_u[:, :u_count].T)
                layer.weight_u_int8.copy_(values)
                layer.weight_u_scale.copy_(scale)
            if v_count:
                values, scale = quantize_rows(weight_v[v_start:v_start + v_count])
                layer.weight_v_int8.copy_(values)
                layer.weight_v_scale.copy_(scale)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def use_fast_layout_(self) -> LowRankLinear:
        """Stores ``weight_u`` column-major again (loaders may hand it over row-major).
        Values, shape and state-dict layout are unchanged. Mutates self; returns it."""
        if self.weight_u.stride()[0] != 1 or self.weight_u.shape[1] <= 1:
            fast = self.weight_u.detach().t().contiguous().t()
            self.weight_u = nn.Parameter(fast, requires_grad=self.weight_u.requires_grad)
        return self

    @property
    def layout(self) -> dict[str, int]:
        """The rank map entry that rebuilds this layer: rank and int8 layout."""
        if not (self.u_int8 or self.v_int8):
            return {"rank": self.rank}
        return {"rank": self.rank, "u_int8": self.u_int8, "v_int8": self.v_int8,
                "v_int8_start": self.v_int8_start}

    @property
    def plan(self) -> RowPlan | None:
        """The int8 rows as a plan that ``from_factors`` maps back to this layout (None when
        the layer has no int8 rows)."""
        if not (self.u_int8 or self.v_int8):
            return None
        index = torch.arange(self.rank)
        start = self.v_int8_start
        return RowPlan(u_int8=index < self.u_int8,
                       v_int8=(index >= start) & (index < start + self.v_int8))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (W_u [out, rank], W_v [rank, in]) in the layer's dtype, dequantized."""
        u, v = self.weight_u, self.weight_v
        if self.u_int8:
            ints = dequantize_rows(self.weight_u_int8, self.weight_u_scale, u.dtype)
            u = torch.cat([ints.T, u], dim=1)
        if self.v_int8:
            ints = dequantize_rows(self.weight_v_int8, self.weight_v_scale, v.dtype)
            a = self.v_int8_start
            v = torch.cat([v[:a], ints, v[a:]])
        return u, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two GEMMs: the thin projection to rank r first, then back up to out_features.

        With int8 rows and many tokens (prefill) the factors are dequantized once per call,
        a cost spread over the tokens; with few tokens (decode) no factor is assembled:
        the int8 blocks go through the fused kernels of ``rankcut.nn.kernels`` (read once,
        converted in registers) and the u-side scales are applied to the r-dimensional
        activations.
        """
        if not (self.u_int8 or self.v_int8):
            return F.linear(F.linear(x, self.weight_v), self.weight_u, self.bias)
        if x.numel() >= DEQUANTIZE_ONCE_TOKENS * x.shape[-1]:
            u, v = self.factors()
            return F.linear(F.linear(x, v), u, self.bias)
        return self._up(self._down(x))

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """z = W_v x, [..., rank]; int8 rows: (x · intsᵀ) · scale."""
        if not self.v_int8:
            return F.linear(x, self.weight_v)
        ints = kernels.rows_dot(x, self.weight_v_int8, self.weight_v_scale)
        if self.v_int8 == self.rank:
            return ints
        z = F.linear(x, self.weight_v)
        a = self.v_int8_start
        return torch.cat([z[..., :a], ints, z[..., a:]], dim=-1)

    def _up(self, z: torch.Tensor) -> torch.Tensor:
        """y = W_u z + b; int8 columns of W_u: (z · scale) @ ints (ints stored [u_int8, out])."""
        if not self.u_int8:
            return F.linear(z, self.weight_u, self.bias)
        scaled = z[..., : self.u_int8] * self.weight_u_scale.to(z.dtype)
        y = kernels.rows_axpy(scaled, self.weight_u_int8)
        if self.u_int8 < self.rank:
            y = y + F.linear(z[..., self.u_int8:], self.weight_u)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """Returns the product W_u W_v, shape [out, in], in the parameters' dtype."""
        u, v = self.factors()
        return u @ v

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
        int8 = (f", u_int8={self.u_int8}, v_int8={self.v_int8}"
                if self.u_int8 or self.v_int8 else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}{int8}")
