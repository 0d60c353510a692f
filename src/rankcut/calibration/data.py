"""Calibration and evaluation data: loading text, turning it into token windows, and the
``Calibration`` set that carries image-text samples for vision-language models."""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError
from ..offline.assets import WIKI_PARTS, wiki_text

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


#: Label of a position that is not predicted (the prompt and image tokens of an image sample).
IGNORE = -100


@dataclass(frozen=True)
class Calibration:
    """Calibration samples of one length, some of which may carry an image.

    A plain [N, L] LongTensor of token windows is text-only calibration; ``as_calibration``
    wraps it. Image-text samples (``image_data.image_text_calibration``) keep the processor's
    image tensors and labels that leave their prompt (with its image tokens) unpredicted.

    Attributes:
        input_ids: [N, L] token ids.
        labels: [N, L] the token each position is, ``IGNORE`` where it is not predicted.
        images: per sample, {processor output name: tensor with a leading batch dimension
            of 1} for its image, or None for a text-only sample.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    images: tuple[dict[str, torch.Tensor] | None, ...]

    @staticmethod
    def concat(parts: list[torch.Tensor | Calibration]) -> Calibration:
        """The samples of ``parts`` (token ids or ``Calibration``s of one length) in order."""
        parts = [as_calibration(part) for part in parts]
        return Calibration(torch.cat([p.input_ids for p in parts]),
                           torch.cat([p.labels for p in parts]),
                           sum((p.images for p in parts), ()))

    @property
    def shape(self) -> torch.Size:
        """[N, L], like the token-id tensor it stands for."""
        return self.input_ids.shape

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def numel(self) -> int:
        """Number of tokens."""
        return self.input_ids.numel()

    @property
    def has_images(self) -> bool:
        """Whether any sample carries an image."""
        return any(image is not None for image in self.images)

    def __getitem__(self, index: slice) -> Calibration:
        """The samples ``index`` (a slice) selects."""
        return Calibration(self.input_ids[index], self.labels[index], self.images[index])

    def split(self, batch_size: int) -> list[Calibration]:
        """Consecutive batches of at most ``batch_size`` samples. A batch never mixes samples
        whose image tensors differ in name or shape (text-only samples are one kind), so that
        each batch's images concatenate into the model's input."""
        batches, start = [], 0
        for end in range(1, len(self) + 1):
            if (end == len(self) or end - start == batch_size
                    or _image_kind(self.images[end]) != _image_kind(self.images[start])):
                batches.append(self[start:end])
                start = end
        return batches

    def model_inputs(self, device: torch.device | str, dtype: torch.dtype | None = None
                     ) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward pass for this batch: ``input_ids``
        and, for image samples, their image tensors concatenated on the batch dimension
        (floating ones cast to ``dtype``)."""
        inputs = {"input_ids": self.input_ids.to(device)}
        if self.images and self.images[0] is not None:
            for key in self.images[0]:
                value = torch.cat([image[key] for image in self.images])
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                inputs[key] = value.to(device)
        return inputs

    @property
    def targets(self) -> torch.Tensor:
        """[N, L-1] the next token of every position but the last (``IGNORE``: none)."""
        return self.labels[:, 1:]

    @property
    def predicted(self) -> int:
        """Number of predicted tokens (what a mean loss divides by)."""
        return int((self.targets != IGNORE).sum())


def _image_kind(image: dict[str, torch.Tensor] | None) -> tuple | None:
    return None if image is None else tuple((k, tuple(v.shape[1:])) for k, v in image.items())


def as_calibration(value: torch.Tensor | Calibration) -> Calibration:
    """Returns ``value`` when it is a ``Calibration``; wraps [N, L] token ids as a
    text-only one (every position predicted) otherwise."""
    if isinstance(value, Calibration):
        return value
    return Calibration(value, value, (None,) * value.shape[0])
