"""The run record: the figures of one ``rankcut compress``, written as ``rankcut_run.json``
next to the checkpoint (and to ``--json``) and read back by ``rankcut report``.

One typed record is the contract between the writer and the reader: the field names are
the JSON keys, and a file written by an older rankcut (fewer fields) still reads, its
missing figures None.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

#: The fields a run JSON must have to be read as one (the rest may be absent).
REQUIRED = ("method", "target_ratio", "perplexity")


@dataclass(frozen=True)
class RunRecord:
    """The figures of one compression run.

    Attributes:
        model, method, settings, output: what was compressed, how, and where it went.
        recipe: the ``--recipe`` whose settings ``settings`` and ``update`` spell out.
        target_ratio, achieved_ratio, achieved_byte_ratio: the ratios asked for and got.
        target_params_dense, target_params_kept: target-layer parameters before and after.
        model_bytes_dense, model_bytes: the model's stored bytes before and after.
        streamed: whether ``--stream`` ran it.
        dense_perplexity, perplexity: perplexity before and after (None: not measured).
        dense_caption_perplexity, caption_perplexity: the same given the image (VLMs).
        stage_losses: the calibration loss after each correction stage.
        anchor_log: the anchored re-cut's error before and after, per layer.
        update, update_log: the parameter update's settings and log.
        compress_seconds, wall_seconds: compression time, and the whole command's.
        peak_rss_mb, peak_gpu_mb: peak memory of the process.
        device, dtype, processes: where and how it ran.
    """

    method: str
    target_ratio: float
    perplexity: float | None
    model: str | None = None
    recipe: str | None = None
    settings: dict = field(default_factory=dict)
    output: str | None = None
    achieved_ratio: float | None = None
    achieved_byte_ratio: float | None = None
    target_params_dense: int | None = None
    target_params_kept: int | None = None
    model_bytes_dense: int | None = None
    model_bytes: int | None = None
    streamed: bool = False
    dense_perplexity: float | None = None
    dense_caption_perplexity: float | None = None
    caption_perplexity: float | None = None
    stage_losses: list = field(default_factory=list)
    anchor_log: list = field(default_factory=list)
    update: dict | None = None
    update_log: list = field(default_factory=list)
    compress_seconds: float | None = None
    wall_seconds: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    device: str | None = None
    dtype: str | None = None
    processes: int = 1

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (its field names are the keys)."""
        return asdict(self)

    @staticmethod
    def matches(data: Any) -> bool:
        """Whether parsed JSON ``data`` is a run record (it has the required fields)."""
        return (isinstance(data, dict) and isinstance(data.get("method"), str)
                and all(key in data for key in REQUIRED))

    @classmethod
    def from_json(cls, data: dict) -> RunRecord:
        """Reads a record from parsed JSON; unknown keys are ignored, missing optional ones
        are None, and a float figure that is not a finite number becomes None.

        Raises:
            ValueError: ``data`` lacks a required field.
        """
        if not cls.matches(data):
            missing = [key for key in REQUIRED if key not in (data or {})]
            raise ValueError(f"not a run record: missing {missing or ['method (a string)']}")
        known = {f.name: str(f.type) for f in fields(cls)}
        return cls(**{key: number(value) if known[key].startswith("float") else value
                      for key, value in data.items() if key in known})

    @property
    def label(self) -> str:
        """The method, with ``+anchored`` for the anchored objective and ``+<update>``
        when a parameter update ran (``svd-llm+anchored+refit``)."""
        parts = [self.method]
        if isinstance(self.settings, dict) and self.settings.get("objective") == "anchored":
            parts.append("anchored")
        if isinstance(self.update, dict) and self.update.get("name"):
            parts.append(self.update["name"])
        return "+".join(parts)


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, not a number, NaN, inf): how a figure
    read back from JSON is taken."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
