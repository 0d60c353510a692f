"""One compression run as a library call.

:class:`CompressJob` holds everything ``rankcut compress`` parses from its flags;
:func:`check` validates it before any model is loaded; :func:`run` loads the model (or
streams it), calibrates, compresses, saves, evaluates and returns the typed
:class:`~rankcut.io.records.RunRecord` that ``--json``, ``rankcut_run.json`` and
``rankcut report`` share. The command line (``cli.py``) only parses flags into a job and
prints what :func:`run` returns.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .architecture import is_vision_language, text_tokenizer
from .errors import CalibrationError, ConfigError, ModelLoadError
from .io.atomic import write_json
from .io.checkpoint import RUN_FILE
from .io.records import RunRecord
from .methods import MethodConfig

logger = logging.getLogger(__name__)

#: ``compress``'s output folder when none is named; a previous rankcut output there is
#: replaced without ``overwrite`` (the user never named it).
DEFAULT_OUTPUT = "rankcut-out"


@dataclass(frozen=True)
class CompressJob:
    """One compression run, every argument parsed; the defaults are the command line's.

    ``output=None`` means :data:`DEFAULT_OUTPUT`; ``max_windows=None`` evaluates every
    window; ``image_samples=None`` starts half of the calibration windows with an image.
    """

    config: MethodConfig
    model: str | None = None
    output: str | None = None
    overwrite: bool = False
    update: Any = None
    recipe: str | None = None
    rank_map: dict[str, int | None] | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    stream: bool = False
    dtype: str = "float32"
    calib: str = "wiki"
    calib_file: str | None = None
    num_samples: int = 64
    seqlen: int = 512
    seed: int = 3
    batch_size: int = 8
    calib_images: str | None = None
    image_samples: int | None = None
    allow_external_images: bool = False
    evaluate: bool = True
    eval: str = "wiki"
    eval_file: str | None = None
    eval_seqlen: int = 2048
    max_windows: int | None = 20
    eval_images: str | None = None

    @property
    def uses_calibration(self) -> bool:
        """Whether the method or the parameter update reads calibration windows."""
        return (self.config.needs_input_stats or self.config.needs_row_fisher
                or self.update is not None)


def check(job: CompressJob) -> CompressJob:
    """Checks what needs no model: counts and lengths, that the named input files exist,
    and that the output may be written (:func:`rankcut.io.outputs.check_output`).

    Returns:
        The job with its output folder resolved.

    Raises:
        ConfigError, CalibrationError: the first argument found wrong.
    """
    from . import loading
    from .io import outputs

    check_counts({"--num-samples": (job.num_samples, 1), "--seqlen": (job.seqlen, 2),
                  "--batch-size": (job.batch_size, 1), "--eval-seqlen": (job.eval_seqlen, 2),
                  "--max-windows": (job.max_windows, 1),
                  "--image-samples": (job.image_samples, 0)},
                 {"--calib-file": job.calib_file, "--eval-file": job.eval_file})
    if job.update is not None and job.update.whole_model and job.stream:
        raise ConfigError(f"--update {job.update.name} is not supported with --stream: lora "
                          "trains the whole model at once; use --update refit or block (block "
                          "by block), or drop --stream where the model fits in memory")
    if job.calib_file and not job.uses_calibration:
        logger.warning("--calib-file %s is not used: method %s needs no calibration data",
                       job.calib_file, job.config.name)
    default = job.output is None
    job = replace(job, output=DEFAULT_OUTPUT if default else job.output)
    source = loading.resolve_model_source(job.model)
    inputs = [source] if Path(source).expanduser().exists() else []
    outputs.check_output(job.output, inputs, overwrite=job.overwrite or default)
    if Path(source).suffix != ".gguf":  # a GGUF's lengths are checked once it is loaded
        check_lengths(_lengths(job), loading.load_config(source))
    return job


def check_counts(counts: dict[str, tuple[int | None, int]], files: dict[str, str | None]
                 ) -> None:
    """Checks each ``{flag: (value, least)}`` count (None = not given) and that each
    ``{flag: path}`` input file exists.

    Raises:
        ConfigError, CalibrationError: the first one found wrong.
    """
    for flag, (value, least) in counts.items():
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be at least {least}; got {value}")
    for flag, path in files.items():
        if path is not None and not Path(path).expanduser().is_file():
            raise CalibrationError(f"{flag} {path}: file not found")


def check_lengths(lengths: dict[str, int], config) -> None:
    """Refuses window lengths (``{flag: tokens}``) above the model's maximum positions.

    Raises:
        ConfigError: a window longer than ``max_position_embeddings``.
    """
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    for flag, value in lengths.items():
        if limit is not None and value > limit:
            raise ConfigError(f"{flag} {value} is above the model's {limit} maximum positions "
                              "(max_position_embeddings)")


def check_images(calib_images: str | None, eval_images: str | None, model, source) -> None:
    """Refuses image options for a model (or config) without a vision side."""
    for flag, value in (("--calib-images", calib_images), ("--eval-images", eval_images)):
        if value and not is_vision_language(model):
            raise ConfigError(f"{flag} needs a vision-language model; "
                              f"{source or 'the default model'} has no vision side")


def _lengths(job: CompressJob) -> dict[str, int]:
    """The window lengths the job uses: calibration when it needs data, evaluation when
    it evaluates."""
    return {**({"--seqlen": job.seqlen} if job.uses_calibration else {}),
            **({"--eval-seqlen": job.eval_seqlen} if job.evaluate else {})}


def run(job: CompressJob, device: str) -> tuple[RunRecord, Any] | None:
    """Runs a checked job (:func:`check`) on ``device``: compresses, writes the output
    folder (with ``rank_map.json`` and ``rankcut_run.json``) and evaluates.

    Under torch.distributed every process calibrates on its share; process 0 alone
    evaluates and writes, and the others return None.

    Returns:
        (the run record, the compression report with its per-module figures) on process 0.
    """
    from .calibration import distributed
    from .loading import DEFAULT_MODEL

    start = time.perf_counter()
    figures = _run_streamed(job, device) if job.stream else _run_resident(job, device)
    if distributed.world()[0] > 0:  # process 0 evaluates and writes; the others wait
        distributed.barrier()
        return None
    report = figures.pop("report")
    out = Path(job.output)
    write_json(out / "rank_map.json", report.rank_map)
    record = RunRecord(
        model=job.model or DEFAULT_MODEL, method=job.config.name, recipe=job.recipe,
        settings=job.config.settings(), output=str(out), target_ratio=job.config.ratio,
        achieved_ratio=report.achieved_ratio, achieved_byte_ratio=report.achieved_byte_ratio,
        target_params_dense=report.dense_params, target_params_kept=report.kept_params,
        streamed=job.stream, stage_losses=report.stage_losses, anchor_log=report.anchor_log,
        update=report.update.settings if report.update else None,
        update_log=report.update.log if report.update else [],
        compress_seconds=report.seconds, wall_seconds=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(), device=device, dtype=job.dtype, peak_gpu_mb=peak_gpu_mb(),
        processes=distributed.world()[1], **figures)
    write_json(out / RUN_FILE, record.to_json())
    distributed.barrier()
    return record, report


def _run_resident(job: CompressJob, device: str) -> dict:
    """Loads the model, calibrates, compresses in memory, saves and evaluates."""
    import torch

    from . import loading
    from .calibration import distributed
    from .compression import pipeline
    from .io import checkpoint
    from .measure.inference import weight_bytes

    dtype = getattr(torch, job.dtype)
    first = distributed.world()[0] == 0
    model, tokenizer = loading.load_model(job.model, dtype=dtype, device=device)
    checkpoint.check_saveable(model)  # before the calibration, not after it
    check_lengths(_lengths(job), model.config)
    check_images(job.calib_images, job.eval_images, model, job.model)
    calib = calibration(job, tokenizer, always=job.update is not None)
    ids = eval_ids(job.eval_file or job.eval, tokenizer) if job.evaluate and first else None
    records = _caption_records(job) if first else None
    dense = _evaluate(model, tokenizer, ids, records, job)
    dense_bytes = weight_bytes(model)
    torch.manual_seed(job.seed)
    report = pipeline.compress(model, job.config, calib, job.include, job.exclude,
                               job.batch_size, rank_map=job.rank_map, update=job.update)
    if not first:
        return {"report": report}
    checkpoint.save_pretrained(model, job.output, tokenizer)
    kept = _evaluate(model, tokenizer, ids, records, job)
    return {"report": report, "model_bytes_dense": dense_bytes,
            "model_bytes": weight_bytes(model), **_figures(dense, kept)}


def _run_streamed(job: CompressJob, device: str) -> dict:
    """``--stream``: compresses block by block from the shards (resuming an interrupted
    run) and evaluates both models the same way, block by block."""
    import torch

    from . import loading
    from .calibration import distributed
    from .compression import streaming
    from .io import checkpoint

    dtype = getattr(torch, job.dtype)
    streaming.return_freed_memory()
    folder = loading.resolve_model_source(job.model)
    if Path(folder).suffix == ".gguf":  # shards are needed: a cached one-time conversion
        folder = str(loading.gguf_as_folder(folder, dtype))
    if not Path(folder).is_dir():
        raise ModelLoadError(f"--stream needs a local Hugging Face folder; got {folder}")
    model_config = loading.load_config(folder)
    check_images(job.calib_images, job.eval_images, model_config, folder)
    tokenizer = loading.load_saved_tokenizer(folder, is_vision_language(model_config))
    if tokenizer is None:
        raise ModelLoadError(f"{folder} has no tokenizer files; --stream reads the tokenizer "
                             "from the model folder")
    calib = calibration(job, tokenizer, always=False)
    streaming.trim_heap()  # the tokenizer's work on the whole calibration text
    first = distributed.world()[0] == 0
    ids = eval_ids(job.eval_file or job.eval, tokenizer) if job.evaluate and first else None
    records = _caption_records(job) if first else None

    def evaluate(path) -> tuple[float | None, float | None]:
        text = None if ids is None else streaming.streamed_perplexity(
            path, ids, job.eval_seqlen, job.max_windows, dtype, device).perplexity
        captions = None if records is None else streaming.streamed_caption_perplexity(
            path, tokenizer, records, dtype, device).perplexity
        return text, captions

    dense = evaluate(folder)
    report = streaming.compress_streaming(folder, job.output, job.config, calib, tokenizer,
                                          job.include, job.exclude, job.batch_size, dtype,
                                          device, job.rank_map, job.update)
    if not first:
        return {"report": report}
    itemsize = torch.empty(0, dtype=dtype).element_size()  # the source as loaded
    dense_bytes = sum(math.prod(shape) * itemsize
                      for _, shape in checkpoint.tensor_specs(folder).values())
    kept_bytes = sum(checkpoint.bytes_by_dtype(job.output).values())
    return {"report": report, "model_bytes_dense": dense_bytes, "model_bytes": kept_bytes,
            **_figures(dense, evaluate(job.output))}


def _figures(dense: tuple, kept: tuple) -> dict:
    return {"dense_perplexity": dense[0], "perplexity": kept[0],
            "dense_caption_perplexity": dense[1], "caption_perplexity": kept[1]}


def _evaluate(model, tokenizer, ids, records, job: CompressJob
              ) -> tuple[float | None, float | None]:
    """(text perplexity, caption perplexity) of an in-memory model; None where not asked."""
    from .measure.evaluation import caption_perplexity

    text = None if ids is None else perplexity(model, ids, job.eval_seqlen, job.max_windows)
    captions = None if records is None else caption_perplexity(model, tokenizer,
                                                               records).perplexity
    return text, captions


def calibration(job: CompressJob, tokenizer, always: bool):
    """The calibration: token windows, plus image-text samples with ``calib_images``
    (``tokenizer`` is then the model's processor); None when the method (and, unless
    ``always``, the update) needs none."""
    from .calibration import data, image_data

    config = job.config
    if not (config.needs_input_stats or config.needs_row_fisher or always):
        return None
    text = data.load_text(job.calib_file or job.calib, part="calib")
    if not job.calib_images:
        return data.calibration_batch(text_tokenizer(tokenizer), text, job.num_samples,
                                      job.seqlen, job.seed)
    images = max(1, job.num_samples // 2) if job.image_samples is None else job.image_samples
    return image_data.mixed_calibration(tokenizer, text, job.num_samples, job.seqlen,
                                        job.seed, job.calib_images, images,
                                        job.allow_external_images)


def _caption_records(job: CompressJob):
    from .calibration.image_data import image_text_source

    if not (job.evaluate and job.eval_images):
        return None
    return image_text_source(job.eval_images, job.allow_external_images)


def eval_ids(source: str, tokenizer):
    """The evaluation token ids of a named text or a local file (its test part)."""
    from .calibration import data

    return data.eval_token_ids(text_tokenizer(tokenizer), data.load_text(source, part="test"))


def perplexity(model, ids, seqlen: int, max_windows: int | None) -> float:
    """The perplexity of ``model`` on ``ids``; non-finite windows are logged."""
    from .measure.evaluation import evaluate

    result = evaluate(model, ids, seqlen=seqlen, max_windows=max_windows)
    if result.nonfinite_windows:
        logger.warning("windows with non-finite loss: %s", result.nonfinite_windows)
    return result.perplexity


def peak_rss_mb() -> float:
    """Returns this process's peak resident memory in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    """Returns the peak CUDA memory allocated by this process in MiB (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20
