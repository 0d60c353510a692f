"""Compressed value cache: keep the latent W_v x of a low-rank ``v_proj`` in the KV cache.

When ``v_proj`` is ``W_u W_v`` with rank r, the values of every cached token are
``W_u z`` with ``z = W_v x``. Attention is linear in the values, so for each query head h
(kv group g): ``softmax(·) V_g = (softmax(·) Z) W_u,gᵀ`` (+ the bias, since attention rows
sum to one). Caching Z (r numbers per token) instead of V (kv_heads · head_dim numbers)
shrinks the value half of the cache by r / (kv_heads · head_dim).

How it plugs into transformers without copying modeling code: ``v_proj`` is swapped for a
``LatentValue`` whose output is Z zero-padded to a multiple of head_dim, so the attention
module's reshape into heads and the cache store it unchanged (as r'/head_dim pseudo
heads); a registered attention function then attends over Z and applies W_u per kv group.
Decode steps read the cache once (no copy of it); a prefill rebuilds the values from Z
once and runs plain SDPA.
Only attention modules with a low-rank ``v_proj`` change; others run plain SDPA.
This is an inference-time switch: ``disable_latent_values`` restores the modules (saving
while it is on is refused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .modules import LowRankLinear

ATTENTION_NAME = "rankcut_latent_values"


class LatentValue(nn.Module):
    """Stands in for a low-rank ``v_proj``: returns Z = W_v x padded to a multiple of
    ``head_dim``; ``project`` applies W_u (and the bias) per kv group after attention.

    Attributes:
        layer: the original ``LowRankLinear`` (its parameters, unchanged).
    """

    def __init__(self, layer: LowRankLinear, head_dim: int) -> None:
        super().__init__()
        if layer.out_features % head_dim:
            raise ConfigError(f"v_proj output {layer.out_features} is not a multiple of the "
                              f"head size {head_dim}")
        self.layer = layer
        self.head_dim = head_dim
        self.kv_heads = layer.out_features // head_dim
        self.rank = layer.rank
        self.padded = -(-layer.rank // head_dim) * head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, w_v = self.layer.factors()
        return F.pad(F.linear(x, w_v), (0, self.padded - self.rank))

    def values(self, cached: torch.Tensor) -> torch.Tensor:
        """[B, r'/d, T, d] cached latents → [B, kv_heads, T, d] values W_u z + b."""
        b, _, t, _ = cached.shape
        z = cached.transpose(1, 2).reshape(b, t, -1)[..., : self.rank]
        w_u, _ = self.layer.factors()
        values = F.linear(z, w_u.to(z.dtype), self.layer.bias)
        return values.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)

    def project(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, T, heads, r] attended latents → [B, T, heads, head_dim] values."""
        b, t, heads, _ = latent.shape
        w_u, _ = self.layer.factors()
        w_u = w_u.reshape(self.kv_heads, self.head_dim, self.rank)
        grouped = latent.reshape(b, t, self.kv_heads, heads // self.kv_heads, self.rank)
        out = torch.einsum("btkgr,kdr->btkgd", grouped, w_u.to(latent.dtype))
        if self.layer.bias is not None:
            out = out + self.layer.bias.view(self.kv_heads, 1, self.head_dim).to(out.dtype)
        return out.reshape(b, t, heads, self.head_dim)


def latent_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: plain SDPA unless ``module.v_proj`` is a
    ``LatentValue``, in which case ``value`` holds the cached latents [B, r'/d, T, d].

    Returns:
        ([B, T_q, heads, head_dim] attention output, None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    latent = getattr(module, "v_proj", None)
    if not isinstance(latent, LatentValue):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, is_causal=is_causal,
                                      **kwargs)
    if query.shape[2] > 1:  # prefill: rebuild the values once, plain SDPA
        return sdpa_attention_forward(module, query, key, latent.values(value),
                                      attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    attended = _decode_step(query, key, value, attention_mask, scaling, latent.rank)
    return latent.project(attended), None


def _decode_step(query, key, value, attention_mask, scaling: float, rank: int) -> torch.Tensor:
    """One query token: scores per kv group, then the probabilities times each cached
    latent chunk (views of the cache, no copy). Returns [B, 1, heads, r]."""
    b, heads, _, d = query.shape
    kv_heads, t = key.shape[1], key.shape[2]
    q = query.view(b, kv_heads, heads // kv_heads, d)
    scores = torch.matmul(q, key.transpose(-1, -2)) * scaling  # [B, kv, groups, T]
    if attention_mask is not None:
        mask = attention_mask[..., -1:, -t:].reshape(attention_mask.shape[0], 1, 1, t)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype).view(b, heads, t)
    chunks = [torch.bmm(probs, value[:, j]) for j in range(value.shape[1])]
    return torch.cat(chunks, dim=-1)[..., :rank].unsqueeze(1)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, latent_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable_latent_values(model: nn.Module) -> int:
    """Caches the latent of every low-rank ``v_proj`` instead of its values. Mutates
    ``model``: swaps those ``v_proj`` for ``LatentValue`` and sets the config's attention
    implementation (remembering the previous one).

    Returns:
        The number of attention modules switched (0: nothing changed).
    """
    switched = 0
    for module in model.modules():
        v_proj = getattr(module, "v_proj", None)
        if isinstance(v_proj, LowRankLinear) and hasattr(module, "head_dim"):
            module.v_proj = LatentValue(v_proj, module.head_dim)
            switched += 1
    if switched:
        _register()
        config = model.config
        config.rankcut_previous_attention = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
    return switched


def disable_latent_values(model: nn.Module) -> None:
    """Undoes ``enable_latent_values``. Mutates ``model``."""
    for module in model.modules():
        if isinstance(getattr(module, "v_proj", None), LatentValue):
            module.v_proj = module.v_proj.layer
    config = model.config
    if hasattr(config, "rankcut_previous_attention"):
        config._attn_implementation = config.rankcut_previous_attention
        del config.rankcut_previous_attention


def uses_latent_values(model: nn.Module) -> bool:
    """True while ``enable_latent_values`` is in effect."""
    return any(isinstance(m, LatentValue) for m in model.modules())
