"""Perplexity in the GPTQ convention (DESIGN.md §4)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationError

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
    windows = split_windows(token_ids, seqlen, max_windows)
    device = next(model.parameters()).device
    nll: list[float] = []
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch"):
            batch = batch.to(device)
            nll.extend(window_nll(model(input_ids=batch, use_cache=False).logits, batch))
    return summarize(nll, windows.shape[1] - 1)


def split_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None
                  ) -> torch.Tensor:
    """Returns the first ``max_windows`` (default all) whole windows, [count, seqlen].

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
    return token_ids[: count * seqlen].view(count, seqlen)


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> list[float]:
    """Summed next-token NLL of each window of ``batch`` given its ``logits``."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                          reduction="none").view(batch.shape[0], -1).double().sum(1)
    return nll.tolist()


def summarize(nll: list[float], tokens_per_window: int | None = None,
              tokens: int | None = None) -> PerplexityResult:
    """The perplexity of windows with summed NLLs ``nll`` over ``tokens`` predicted tokens
    (default ``len(nll) * tokens_per_window``); logs the non-finite windows."""
    bad = [i for i, value in enumerate(nll) if not math.isfinite(value)]
    if bad:
        logger.warning("non-finite loss in %d window(s): %s", len(bad), bad)
    tokens = len(nll) * tokens_per_window if tokens is None else tokens
    mean = sum(nll) / tokens
    ppl = math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf")
    if math.isnan(mean):
        ppl = float("nan")
    return PerplexityResult(ppl, mean, len(nll), tokens, bad)


def caption_perplexity(model: nn.Module, processor: Any, records: list[dict[str, Any]]
                       ) -> PerplexityResult:
    """Perplexity of each record's text given its image and prompt (a vision-language model).

    Each record goes through the processor as in calibration
    (``image_data.encode_image_text``: chat template, image tokens, then the text) and only
    the tokens of its text are scored. One record per forward pass.

    Args:
        model: a vision-language model.
        processor: its processor.
        records: image-text records (``image``, ``prompt``, ``text``).

    Raises:
        CalibrationError: no record has any text, or an image cannot be read.
    """
    from ..calibration.data import IGNORE
    from ..calibration.image_data import encode_image_text

    parameter = next(model.parameters())
    nll, tokens = [], 0
    with torch.no_grad():
        for record in tqdm(records, desc="caption perplexity", unit="image"):
            sample = encode_image_text(processor, record).as_calibration()
            if sample.predicted == 0:
                continue
            inputs = sample.model_inputs(parameter.device, parameter.dtype)
            logits = model(**inputs, use_cache=False).logits[0, :-1]
            nll.append(float(F.cross_entropy(logits.float(), sample.targets[0].to(logits.device),
                                             ignore_index=IGNORE, reduction="sum")))
            tokens += sample.predicted
    if not nll:
        raise CalibrationError("no image-text record has any text to score")
    return summarize(nll, tokens=tokens)
