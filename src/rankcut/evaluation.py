"""Perplexity in the GPTQ convention (DESIGN.md §4)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import CalibrationError

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """Perplexity over non-overlapping windows.

    Attributes:
        perplexity: exp(mean NLL) over every predicted token; NaN/inf when a window was.
        nll: mean negative log-likelihood per predicted token.
        windows: number of windows evaluated.
        tokens: number of predicted tokens.
        nonfinite_windows: indices of windows whose loss was NaN or infinite (kept in the
            mean, never dropped).
    """

    perplexity: float
    nll: float
    windows: int
    tokens: int
    nonfinite_windows: list[int] = field(default_factory=list)


def evaluate(model: nn.Module, token_ids: torch.Tensor, seqlen: int = 2048,
             max_windows: int | None = None, batch_size: int = 1) -> PerplexityResult:
    """Computes perplexity on non-overlapping ``seqlen`` windows of one token stream.

    The stream is the test text joined with "\\n\\n" and tokenized once; the trailing
    partial window is dropped, as in GPTQ. Each window predicts its tokens 2..seqlen.

    Args:
        model: a causal LM.
        token_ids: 1-D token ids of the whole evaluation text.
        seqlen: window length.
        max_windows: evaluate only the first N windows.
        batch_size: windows per forward pass.

    Returns:
        The result; non-finite windows are listed and logged, and make the perplexity
        non-finite.

    Raises:
        CalibrationError: the text is shorter than one window.
    """
    count = token_ids.numel() // seqlen
    if count == 0:
        raise CalibrationError(
            f"evaluation text has {token_ids.numel()} tokens; one window needs {seqlen}"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    windows = token_ids[: count * seqlen].view(count, seqlen)
    device = next(model.parameters()).device
    total, tokens, bad = 0.0, 0, []
    with torch.no_grad():
        for start in tqdm(range(0, count, batch_size), desc="perplexity", unit="batch"):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                  reduction="none").view(batch.shape[0], -1).double().sum(1)
            for offset, value in enumerate(nll.tolist()):
                if not math.isfinite(value):
                    bad.append(start + offset)
                total += value
            tokens += batch[:, 1:].numel()
    if bad:
        logger.warning("non-finite loss in %d window(s): %s", len(bad), bad)
    mean = total / tokens
    ppl = math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf")
    if math.isnan(mean):
        ppl = float("nan")
    return PerplexityResult(ppl, mean, count, tokens, bad)
