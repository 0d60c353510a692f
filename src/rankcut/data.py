"""Calibration and evaluation text: loading it and turning it into token ids."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from rankcut.assets import WIKI_PARTS, wiki_text
from rankcut.errors import CalibrationError

logger = logging.getLogger(__name__)

# name -> (load_dataset positional args, {part: load_dataset kwargs}, text column(s), joiner);
# with several columns, each row's non-empty fields are joined by newlines
HF_DATASETS: dict[str, tuple[tuple[str, ...], dict[str, dict[str, Any]],
                             str | tuple[str, ...], str]] = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"),
                  {"calib": {"split": "train"}, "test": {"split": "test"}}, "text", "\n\n"),
    "c4": (("allenai/c4",),
           {part: {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                   "split": "validation"} for part in WIKI_PARTS}, "text", "\n\n"),
    "ptb": (("ptb_text_only", "penn_treebank"),
            {"calib": {"split": "train"}, "test": {"split": "test"}}, "sentence", "\n\n"),
    # instruction data for the LoRA update (train split only: both parts read it)
    "alpaca": (("yahma/alpaca-cleaned",), {part: {"split": "train"} for part in WIKI_PARTS},
               ("instruction", "input", "output"), "\n\n"),
}
SOURCES = ("wiki", *HF_DATASETS, "<file>.txt", "<file>.jsonl")


def _read_jsonl(path: Path) -> str:
    """Join the ``"text"`` fields of a JSON-lines file with blank lines; blank lines are skipped."""
    texts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationError(f'{path}, line {lineno}: no string "text" field')
            texts.append(record["text"])
    return "\n\n".join(texts)


def _read_file(path: Path) -> str:
    """Read a ``.txt`` (UTF-8) or ``.jsonl`` calibration file."""
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    try:
        return _read_jsonl(path) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc


def _load_hf(name: str, part: str) -> str:
    """Fetch a Hugging Face dataset with the ``datasets`` package and join its text column."""
    args, kwargs, column, joiner = HF_DATASETS[name]
    logger.info("loading dataset %s (%s) from the Hugging Face hub", name, part)
    try:
        datasets = importlib.import_module("datasets")
        table = datasets.load_dataset(*args, **kwargs[part])
        rows = (table[column] if isinstance(column, str) else
                ["\n".join(row[c] for c in column if row[c]) for row in table])
    except Exception as exc:  # ImportError, network errors, missing configs, ...
        raise CalibrationError(
            f"dataset {name!r} could not be fetched ({type(exc).__name__}: {exc}); "
            "use a local text file instead with --calib-file"
        ) from exc
    return joiner.join(rows)


def load_text(source: str, part: str = "calib") -> str:
    """Return the text of ``part`` ("calib" or "test") of a calibration/evaluation source.

    Args:
        source: ``"wiki"`` (built-in offline Wikipedia text), ``"wikitext2"``, ``"c4"``, ``"ptb"``
            (Hugging Face datasets, need the hub), or a local ``.txt`` / ``.jsonl`` path (the same
            file serves every part).
        part: ``"calib"`` or ``"test"``.

    Raises:
        CalibrationError: Unknown source or part, missing or unreadable file, bad JSON line,
            dataset not fetchable, or empty text.
    """
    if part not in WIKI_PARTS:
        raise CalibrationError(f"unknown text part {part!r}; choose one of {', '.join(WIKI_PARTS)}")
    if source == "wiki":
        text = wiki_text(part)
    elif source in HF_DATASETS:
        text = _load_hf(source, part)
    elif source.endswith((".txt", ".jsonl")):
        text = _read_file(Path(source))
    elif Path(source).exists():
        raise CalibrationError(f"unsupported calibration file {source}; use a .txt or .jsonl file")
    else:
        choices = ", ".join(SOURCES)
        raise CalibrationError(f"unknown text source {source!r}; choose one of {choices}")
    if not text.strip():
        raise CalibrationError(f"the {part} text from {source} is empty")
    return text


def _encode(tokenizer: Any, text: str, what: str) -> torch.Tensor:
    """Tokenize ``text`` once, without special tokens, into a 1-D LongTensor.

    ``verbose=False`` silences the "sequence longer than model_max_length" warning: the ids are
    cut into windows afterwards, never fed whole to the model.
    """
    if not text.strip():
        raise CalibrationError(f"{what} text is empty")
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    if not ids:
        raise CalibrationError(f"{what} text produced no tokens")
    return torch.tensor(ids, dtype=torch.long)


def calibration_batch(
    tokenizer: Any, text: str, num_samples: int, seqlen: int, seed: int
) -> torch.LongTensor:
    """Cut ``num_samples`` random windows of ``seqlen`` tokens out of ``text`` (GPTQ style).

    Window starts are drawn from ``torch.Generator().manual_seed(seed)``, so the batch depends
    only on the text, tokenizer, sizes and seed. Returns a LongTensor [num_samples, seqlen].

    Raises:
        CalibrationError: ``num_samples < 1``, ``seqlen < 2``, empty text, or fewer than
            ``seqlen + 1`` tokens.
    """
    if num_samples < 1:
        raise CalibrationError(f"num_samples must be at least 1, got {num_samples}")
    if seqlen < 2:
        raise CalibrationError(f"seqlen must be at least 2, got {seqlen}")
    ids = _encode(tokenizer, text, "calibration")
    if ids.numel() < seqlen + 1:
        raise CalibrationError(
            f"calibration text has {ids.numel()} tokens; at least seqlen+1 = {seqlen + 1} are "
            f"needed for windows of {seqlen} tokens (use a longer text or a smaller --seqlen)"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (num_samples,), generator=generator)
    return ids[starts[:, None] + torch.arange(seqlen)]


def eval_token_ids(tokenizer: Any, text: str) -> torch.LongTensor:
    """Tokenize the (already blank-line-joined) evaluation text once; return 1-D token ids."""
    return _encode(tokenizer, text, "evaluation")
