"""Top-K pseudo-gradients of the KL divergence (the output side of IO-SVD).

To second order, KL(p‖p′) ≈ ½ δzᵀ F δz for a change δz of the logits, with
F = diag(p) − p pᵀ. Restricted to the K most likely tokens (p renormalized over them),
F = Σ_k p_k (e_k − p)(e_k − p)ᵀ = Σ_k a_k a_kᵀ with a_k = √p_k (e_k − p). Back-propagating
a_k from the logits to a layer's output gives the vectors whose second moment is the
layer's output metric C.

Pure functions: logits in, seed tensors out; no model, no hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

#: ``exact``: K backward passes, one per top-K token; ``sample``: one pass with one token
#: drawn from the renormalized top-K distribution at each position.
KL_MODES = ("exact", "sample")


def top_k_probs(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (p [..., K] renormalized over the K most likely tokens, their indices)."""
    values, index = logits.detach().float().topk(min(top_k, logits.shape[-1]), dim=-1)
    return torch.softmax(values, dim=-1), index


def kl_draws(probs: torch.Tensor, mode: str,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns the random part of one batch's seeds, drawn on the CPU from ``generator``.

    Args:
        probs: [..., K] renormalized top-K probabilities (``top_k_probs``).
        mode: ``"sample"``: the drawn top-K slot at each position (int64); ``"exact"``: a
            sign ±1 at each position (float32).
        generator: CPU random source (advanced by the draw).

    Returns:
        [..., 1] on the CPU.
    """
    if mode == "sample":
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]).cpu(), 1,
                                  generator=generator)
        return drawn.view(*probs.shape[:-1], 1)
    return torch.randint(0, 2, (*probs.shape[:-1], 1), generator=generator).float() * 2 - 1


def kl_seeds(logits: torch.Tensor, top_k: int, mode: str,
             generator: torch.Generator | None = None,
             draw: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> Iterator[torch.Tensor]:
    """Yields the pseudo-gradients to back-propagate from ``logits`` (same shape, float32).

    ``exact`` yields K seeds ε_t·a_k with a random sign ε_t per position: Σ_k a_k a_kᵀ is
    the top-K Fisher at each position, and the signs make the cross-position terms of the
    back-propagated vectors vanish in expectation. ``sample`` yields one seed e_s − p with
    s ~ p, whose expected outer product is the same Fisher.

    Args:
        logits: [..., V] logits of the original model.
        top_k: K, the number of most likely tokens kept.
        mode: ``"exact"`` or ``"sample"``.
        generator: CPU random source for the signs / samples; the draws are made on the
            CPU whatever the logits' device, so a seed gives the same draws on any device.
        draw: replaces ``kl_draws(probs, mode, generator)``: called once with the top-K
            probabilities, returns the same kind of draws (a distributed run replays every
            rank's draws in global batch order).

    Raises:
        ValueError: unknown mode.
    """
    if mode not in KL_MODES:
        raise ValueError(f"unknown KL mode {mode!r}; choose one of {', '.join(KL_MODES)}")
    probs, index = top_k_probs(logits, top_k)
    drawn = draw(probs) if draw is not None else kl_draws(probs, mode, generator)
    yield from seeds_from_draws(logits.shape, probs, index, drawn, mode)


def seeds_from_draws(shape: torch.Size, probs: torch.Tensor, index: torch.Tensor,
                     drawn: torch.Tensor, mode: str) -> Iterator[torch.Tensor]:
    """Yields ``kl_seeds``'s pseudo-gradients from its parts: the top-K probabilities and
    indices of logits of ``shape`` [..., V] and the draws (``kl_draws``) made from them,
    on ``probs``' device (float32)."""
    device = probs.device
    drawn = drawn.to(device)
    if mode == "sample":
        seed = torch.zeros(shape, dtype=torch.float32, device=device)
        seed.scatter_(-1, index, -probs)
        seed.scatter_add_(-1, index.gather(-1, drawn),
                          torch.ones(*shape[:-1], 1, device=device))
        yield seed
        return
    for k in range(probs.shape[-1]):
        root = probs[..., k:k + 1].sqrt() * drawn
        seed = torch.zeros(shape, dtype=torch.float32, device=device)
        seed.scatter_(-1, index, -probs * root)
        seed.scatter_add_(-1, index[..., k:k + 1], root)
        yield seed


def top_k_fisher(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Returns the dense V×V top-K Fisher diag(p) − p pᵀ of one position's logits [V]
    (p renormalized over the top K, zero elsewhere); for tests and small vocabularies."""
    probs, index = top_k_probs(logits, top_k)
    p = torch.zeros(logits.shape[-1], dtype=torch.float64, device=logits.device)
    p[index] = probs.double()
    return torch.diag(p) - torch.outer(p, p)


def predicted_kl(sigma_dropped: torch.Tensor) -> float:
    """Returns ½ Σ σ_i² over the dropped components: the second-order KL increase of a
    truncation in the two-sided (KL) metric."""
    return 0.5 * float(sigma_dropped.double().square().sum())
