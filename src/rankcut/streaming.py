"""Streaming compression: models larger than memory, block by block from safetensors shards.

The model is built empty (parameters on the meta device) and each part is read from the
shards only while it is needed: the embeddings to capture the first block's inputs, one
decoder block at a time to gather its statistics and factorize it, the head for the loss
and KL seeds. Calibration activations and back-propagated vectors live on disk, one file
per batch, in a work folder beside the output. Gradient-based statistics (zero-sum,
io-svd) use a block-wise backward: the forward pass keeps every block's input on disk,
the head turns the last one into loss and KL seed vectors, and the blocks are then
recomputed from the top, each back-propagating its vectors to the block below.

Every finished step is committed to the work folder (its files first, then an atomic
progress record), so a killed run rerun with the same arguments resumes after the last
committed step; the output folder appears, atomically, only once it is whole.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from . import distributed, fisher, linalg
from .allocation import global_select, kept_params, loss_balanced_ranks, uniform_ranks
from .blocks import capture_block_inputs, kwarg_sources
from .checkpoint import (
    MARKER_SUFFIX,
    record_shard_digests,
    safetensors_problem,
    write_dir_atomically,
)
from .data import Calibration
from .errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    ModelLoadError,
    UnsupportedModelError,
)
from .evaluation import PerplexityResult, split_windows, summarize, window_nll
from .hooks import InputMomentHooks
from .hybrid import classic_cost, classic_plan
from .methods import MethodConfig, method_spec
from .models import (
    block_index,
    check_safetensors_folder,
    find_decoder_blocks,
    select_targets,
)
from .modules import LowRankLinear
from .outputs import check_replaceable
from .pipeline import CompressionReport, ModuleResult, _check_inputs, _factorize

logger = logging.getLogger(__name__)

WORK_SUFFIX = ".rankcut-work"  # the work folder is ``.<output name>.rankcut-work``
PROGRESS = "progress.json"


class ShardReader:
    """Reads single tensors from a safetensors checkpoint folder, on demand.

    Each read opens the shard, copies one tensor out and closes it again, so no mapped
    pages stay resident between reads.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        check_safetensors_folder(folder)  # a cut or corrupt shard: ModelLoadError, now
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                self.weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ModelLoadError(f"{index} is corrupt: {err}") from err
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                self.weight_map = {name: "model.safetensors" for name in f.keys()}
        else:
            raise ModelLoadError(f"{folder} has no model.safetensors or index: streaming needs "
                                 "a Hugging Face folder of safetensors shards")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Returns the tensor ``name`` cast to ``dtype`` on ``device``."""
        with safe_open(self.folder / self.weight_map[name], framework="pt") as f:
            tensor = f.get_tensor(name)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.to(device)


class StreamedModel:
    """A model whose parameters stay on the meta device until a part is loaded.

    Tied parameters (an lm_head sharing the embedding matrix) are loaded and released
    together.

    Attributes:
        model: the skeleton (real buffers, meta parameters until loaded).
        prefix, blocks: the decoder block list and its qualified name.
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder).expanduser()
        if not (self.folder / "config.json").is_file():
            raise ModelLoadError(f"{self.folder} is not a model folder: it has no config.json")
        self.reader = ShardReader(self.folder)
        self.dtype, self.device = dtype, torch.device(device)
        config = AutoConfig.from_pretrained(self.folder)
        entry = getattr(config, "quantization_config", None)
        if isinstance(entry, dict):
            del config.quantization_config
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.model.tie_weights()  # tied parameters become one object, loaded once
        if isinstance(entry, dict) and entry.get("quant_method") == "rankcut":
            from .checkpoint import replace_with_low_rank

            replace_with_low_rank(self.model, entry["rank_map"], dtype, "meta",
                                  entry.get("int8_layout"))
        self.prefix, self.blocks = find_decoder_blocks(self.model)
        self._names = {id(m): n for n, m in self.model.named_modules()}
        self._aliases: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            self._aliases.setdefault(id(param), []).append(name)

    def _set(self, name: str, value: torch.Tensor) -> None:
        owner, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(owner)
        slots = module._parameters if isinstance(value, nn.Parameter) else module._buffers
        slots[leaf] = value

    def load(self, module: nn.Module) -> nn.Module:
        """Reads ``module``'s parameters and persistent buffers from the shards (cast to the
        model's dtype, on its device). Mutates the skeleton; returns ``module``.

        Raises:
            ModelLoadError: a parameter is missing from every shard.
        """
        prefix = self._names[id(module)]
        for name, param in list(module.named_parameters(prefix=prefix)):
            aliases = self._aliases.pop(id(param), [name])
            stored = next((a for a in aliases if a in self.reader), None)
            if stored is None:
                raise ModelLoadError(f"{name} is in none of the shards of {self.folder}")
            tensor = nn.Parameter(self.reader.get(stored, self.dtype, self.device),
                                  requires_grad=False)
            for alias in aliases:
                self._set(alias, tensor)
            self._aliases[id(self.model.get_parameter(name))] = aliases
        for name, buffer in list(module.named_buffers(prefix=prefix)):
            if name in self.reader:
                dtype = self.dtype if buffer.is_floating_point() else buffer.dtype
                self._set(name, self.reader.get(name, dtype, self.device))
        for sub in module.modules():
            if isinstance(sub, LowRankLinear):
                sub.use_fast_layout_()
        return module

    def release(self, module: nn.Module) -> None:
        """Puts ``module``'s parameters (and their tied copies) back on the meta device,
        freeing their memory. Mutates the skeleton."""
        prefix = self._names.get(id(module))
        for name, param in list(module.named_parameters(prefix=prefix)):
            aliases = self._aliases.pop(id(param), [name])
            empty = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
            for alias in aliases:
                self._set(alias, empty)
            self._aliases[id(self.model.get_parameter(name))] = aliases
        for name, buffer in list(module.named_buffers(prefix=prefix)):
            if name in self.reader or isinstance(self.model.get_submodule(
                    name.rpartition(".")[0]), LowRankLinear):
                self._set(name, torch.empty_like(buffer, device="meta"))

    def block(self, index: int) -> nn.Module:
        """Loads decoder block ``index`` and returns it."""
        return self.load(self.blocks[index])

    def outside(self, skip_head: bool) -> list[nn.Module]:
        """The modules outside the decoder blocks that hold parameters (embeddings, norms,
        the head), without the output embeddings when ``skip_head`` and without the input
        embeddings otherwise (tied ones are kept: they are the same matrix)."""
        tied = self.model.get_output_embeddings()
        embeddings = self.model.get_input_embeddings()
        skip = tied if skip_head else embeddings
        if tied is not None and embeddings is not None and \
                tied.weight is embeddings.weight:
            skip = None
        inside = {id(m) for m in self.blocks.modules()}
        held = []
        for module in self.model.modules():
            if id(module) in inside or module is skip:
                continue
            if next(module.parameters(recurse=False), None) is not None:
                held.append(module)
        return held

    @contextlib.contextmanager
    def parts(self, modules: list[nn.Module]):
        """Loads ``modules`` for the duration of the context, then releases them."""
        for module in modules:
            self.load(module)
        try:
            yield
        finally:
            for module in modules:
                self.release(module)


@contextlib.contextmanager
def _without_blocks(sm: StreamedModel):
    """Empties the decoder block list for the duration, so that a forward pass from
    ``inputs_embeds`` runs only the final norm and the head."""
    owner, _, leaf = sm.prefix.rpartition(".")
    parent = sm.model.get_submodule(owner)
    setattr(parent, leaf, nn.ModuleList())
    try:
        yield
    finally:
        setattr(parent, leaf, sm.blocks)


def head_logits(sm: StreamedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of the model's head (final norm, lm_head, any soft-capping) applied to the
    last block's output ``hidden`` [B, T, H]; the head must be loaded.

    Raises:
        UnsupportedModelError: the model adds learned position embeddings to its inputs
            (OPT, GPT-2 style), so a forward pass from ``inputs_embeds`` is not the head.
    """
    tokens = sm.model.get_input_embeddings()
    if any(isinstance(m, nn.Embedding) and m is not tokens for m in sm.outside(False)):
        raise UnsupportedModelError(f"{type(sm.model).__name__} adds learned position "
                                    "embeddings; streaming supports its uniform methods only")
    with _without_blocks(sm):
        return sm.model(inputs_embeds=hidden, use_cache=False).logits


class WorkFolder:
    """The work folder of one streamed run: activation files and an atomic progress record.

    ``.<output name>.rankcut-work<suffix>`` beside the output; each process of a
    distributed run has its own (suffix ``-<rank>-of-<size>``), and they resume only when
    all of them stopped at the same step (else all start over). A damaged progress record
    is logged and the run starts over.

    Attributes:
        path: the folder.
        progress: {step name: count done, ...}; also the finished module results.
    """

    def __init__(self, output: Path, fingerprint: str, suffix: str = "") -> None:
        self.path = output.parent / f".{output.name}{WORK_SUFFIX}{suffix}"
        progress = _read_progress(self.path / PROGRESS)
        steps = _steps(progress)
        if suffix and not distributed.agree(steps):
            logger.warning("the processes stopped at different steps; starting over")
            progress = {}
        if progress.get("fingerprint") != fingerprint:
            if progress:
                logger.warning("%s belongs to a run with other arguments; starting over",
                               self.path)
            shutil.rmtree(self.path, ignore_errors=True)
            progress = {"fingerprint": fingerprint}
        elif len(progress) > 1:
            logger.info("resuming from %s: %s", self.path,
                        {k: v for k, v in progress.items() if isinstance(v, int)})
        self.path.mkdir(parents=True, exist_ok=True)
        self.progress = progress

    def done(self, step: str) -> int:
        """How many units of ``step`` were committed."""
        return int(self.progress.get(step, 0))

    def steps(self) -> str:
        """The committed steps as canonical JSON (what the processes compare)."""
        return _steps(self.progress)

    def start_over(self) -> None:
        """Deletes every work file and the progress record: the run starts from scratch."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.progress = {"fingerprint": self.progress["fingerprint"]}

    def commit(self, **updates) -> None:
        """Records ``updates`` in the progress file atomically (write, fsync, rename) and
        logs them with the process's peak RSS so far."""
        self.progress.update(updates)
        _atomic_write(self.path / PROGRESS, json.dumps(self.progress).encode())
        trim_heap()
        steps = ", ".join(f"{k}={v}" for k, v in updates.items() if isinstance(v, int))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        logger.info("committed %s; peak RSS %.0f MiB", steps, peak)

    def file(self, kind: str, *parts: int | str) -> Path:
        """The path of one work file, e.g. ``file("acts", 3, 0)`` → acts/3/0.safetensors.
        Side effect: creates its folder."""
        path = self.where(kind, *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def where(self, kind: str, *parts: int | str) -> Path:
        """The path of one work file, as :meth:`file` gives it, without creating anything."""
        return self.path.joinpath(kind, *map(str, parts[:-1])) / f"{parts[-1]}.safetensors"

    def drop(self, kind: str, *parts: int | str) -> None:
        """Deletes a folder of work files that is no longer needed."""
        shutil.rmtree(self.path.joinpath(kind, *map(str, parts)), ignore_errors=True)


#: Progress entries that are not step counts.
_NOT_STEPS = ("fingerprint", "results")


def _steps(progress: dict) -> str:
    """The step counts (and fingerprint) of a progress record as canonical JSON."""
    return json.dumps({k: v for k, v in progress.items() if k != "results"}, sort_keys=True)


def _progress_problem(progress: object) -> str | None:
    """What makes a parsed progress record unlike any :meth:`WorkFolder.commit` writes,
    or None."""
    if not isinstance(progress, dict):
        return f"a JSON {type(progress).__name__}, not an object"
    if not isinstance(progress.get("fingerprint"), str):
        return "no fingerprint"
    bad = [k for k, v in progress.items() if k not in _NOT_STEPS
           and (not isinstance(v, int) or isinstance(v, bool) or v < 0)]
    if bad:
        return f"step {bad[0]!r} is not a count"
    results = progress.get("results", [])
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        return "the module results are not a list of objects"
    return None


def _read_progress(record: Path) -> dict:
    """Returns a work folder's progress record: {} when there is none, and {} with a
    warning naming it when it is damaged (unreadable, not JSON, or not what
    :meth:`WorkFolder.commit` writes), so that the run starts over."""
    if not record.is_file():
        return {}
    try:
        progress = json.loads(record.read_bytes())
    except (OSError, ValueError) as err:  # ValueError: JSON and UTF-8 decoding errors
        problem: str | None = str(err)
    else:
        problem = _progress_problem(progress)
    if problem:
        logger.warning("the progress record %s is damaged (%s); starting over", record,
                       problem)
        return {}
    return progress


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes ``tensors`` to a safetensors file atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Reads every tensor of a work file (safetensors).

    Raises:
        CheckpointError: the file is missing or damaged; a rerun checks the work files
            before it resumes and recomputes the damaged steps.
    """
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"work file {path} is missing or damaged ({err}); run the same "
                              "command again to recompute it") from err


#: glibc's mallopt parameter number for the mmap threshold.
_M_MMAP_THRESHOLD = -3


def _libc():
    """glibc, or None where the C library is another."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Returns the free pages of the C heap to the system (glibc's ``malloc_trim``; a
    no-op elsewhere). Freed small objects, e.g. the tokenizer's work on the calibration
    text, otherwise stay in the process's resident memory."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Makes glibc serve allocations above ``threshold`` bytes with their own mappings, so
    that a freed tensor goes back to the system instead of fragmenting the heap: without
    it a streamed run's peak RSS creeps up block after block.

    Side effect: changes this process's allocator setting (call it from the program that
    owns the process, as ``rankcut compress --stream`` does). Returns False (and changes
    nothing) where the C library is not glibc.
    """
    libc = _libc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))


@dataclass
class StreamSettings:
    """What a streamed run was asked to do: the inputs of its fingerprint."""

    source: str
    output: str
    config: MethodConfig
    calibration: torch.Tensor | None
    include: list[str] | None
    exclude: list[str] | None
    batch_size: int
    dtype: torch.dtype
    rank_map: dict | None

    def fingerprint(self) -> str:
        """A digest of everything that determines the output; a rerun resumes only when
        it matches."""
        from . import __version__

        calib = self.calibration
        digest = hashlib.sha256()
        digest.update(json.dumps({
            "source": str(Path(self.source).resolve()), "method": self.config.name,
            "settings": self.config.settings(), "include": self.include,
            "exclude": self.exclude, "batch_size": self.batch_size, "dtype": str(self.dtype),
            "rank_map": self.rank_map, "version": __version__,
            "calib_shape": None if calib is None else list(calib.shape),
        }, sort_keys=True).encode())
        if calib is not None:
            digest.update(calib.to(torch.int64).numpy().tobytes())
        return digest.hexdigest()


def compress_streaming(
    source: str | Path,
    output: str | Path,
    config: MethodConfig,
    calibration: torch.Tensor | Calibration | None,
    tokenizer=None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    rank_map: dict[str, int | None] | None = None,
) -> CompressionReport:
    """Compresses the safetensors model in ``source`` into the checkpoint folder ``output``
    without ever holding more than one decoder block (plus the embeddings or the head).

    The factors equal those of ``pipeline.compress`` on the whole model (to float
    tolerance: a block-wise backward sums in another order). Side effects: writes the work
    folder ``.<output>.rankcut-work`` beside ``output`` (resumed when it matches these
    arguments, deleted at the end) and then ``output`` itself, atomically.

    Args:
        source: a Hugging Face folder of safetensors shards.
        output: the checkpoint folder to write.
        config, calibration, include, exclude, batch_size, rank_map: as for
            ``pipeline.compress``.
        tokenizer: saved into ``output`` when given.
        dtype: dtype of the loaded weights and of the output.
        device: where blocks are computed.

    Returns:
        The report, as ``pipeline.compress`` gives it.

    Raises:
        ConfigError: a setting streaming does not support (correction stages, a
            loss-aware int8 remap, FWSVD's per-sample Fisher, image calibration).
        ModelLoadError, CalibrationError, UnsupportedModelError: as ``pipeline.compress``.
    """
    if isinstance(calibration, Calibration):
        if calibration.has_images:
            raise ConfigError("image-text calibration is not supported with streaming; "
                              "compress the vision-language model in memory")
        calibration = calibration.input_ids
    sm = StreamedModel(source, dtype, device)
    output = Path(output)
    check_replaceable(output)  # now, not after the whole run
    targets = select_targets(sm.model, include, exclude)
    _check_inputs(sm.model, config, targets, calibration, rank_map, None)
    _check_streamable(config, targets, sm.prefix)
    settings = StreamSettings(str(source), str(output), config, calibration, include,
                              exclude, batch_size, dtype, rank_map)
    rank, size = distributed.world()
    work = WorkFolder(output, settings.fingerprint(), f"-{rank}-of-{size}" if size > 1 else "")
    report = CompressionReport(method=config.name, settings=config.settings())
    start = time.perf_counter()
    batches, grad_batches = _calibration_batches(config, calibration, batch_size)
    run = _StreamRun(sm, work, config, targets, batches, grad_batches)
    if config.allocation == "global" and calibration is not None:
        grad_samples = getattr(config, "grad_samples", None) or calibration.shape[0]
        run.idle_steps = distributed.idle_steps(
            len(calibration[:grad_samples].split(config.grad_batch_size)))
    stored, mode = True, _mode(config, rank_map)
    run.recover(mode)
    if mode == "backward":
        run.store_by_backward(scoring=rank_map is None)
        ranks, plans = run.select(rank_map)
    elif mode == "forward":
        run.store_by_forward()
        ranks, plans = run.select(None)
    else:
        shapes = {name: tuple(layer.weight.shape) for name, layer in targets.items()}
        ranks, plans, stored = rank_map or uniform_ranks(shapes, config.ratio), {}, False
    run.write_blocks(ranks, plans, stored)
    report.modules.extend(ModuleResult(**{**r, "shape": tuple(r["shape"])})
                          for r in work.progress["results"])
    report.seconds = time.perf_counter() - start
    sm.model.config.quantization_config = report.quantization_config()
    if rank == 0:  # under torch.distributed, process 0 writes; the others wait
        _assemble(sm, work, output, tokenizer)
    distributed.barrier()
    shutil.rmtree(work.path, ignore_errors=True)
    return report


def _mode(config: MethodConfig, rank_map: dict | None) -> str:
    """How a streamed run proceeds: ``"backward"`` (forward pass, head, block-wise
    backward storing every factor, then allocation), ``"forward"`` (factors stored block
    by block, then allocation) or ``"uniform"`` (ranks known: blocks written directly)."""
    if config.allocation == "global" and (rank_map is None or config.needs_output_stats):
        return "backward"
    if config.allocation == "truncation-loss" and rank_map is None:
        return "forward"
    return "uniform"


def _calibration_batches(config: MethodConfig, calibration: torch.Tensor | None,
                         batch_size: int) -> tuple[list[torch.Tensor], int]:
    """The calibration batches and how many of them (the first) enter the gradients.

    Global methods batch as the whole-model gradient pass does: the first
    ``grad_samples`` samples in batches of ``grad_batch_size``, then the rest (input
    statistics only) in batches of the same size.
    """
    if calibration is None or calibration.numel() == 0:
        return [], 0
    if config.allocation != "global":
        return distributed.my_batches(calibration, batch_size), 0
    grad_samples = getattr(config, "grad_samples", None) or calibration.shape[0]
    size = config.grad_batch_size
    grad = distributed.my_batches(calibration[:grad_samples], size)
    rank, processes = distributed.world()
    rest = calibration[grad_samples:]
    rest = list(rest.split(size))[rank::processes] if len(rest) else []
    return grad + rest, len(grad)


def _check_streamable(config: MethodConfig, targets: dict, prefix: str) -> None:
    if config.needs_row_fisher:
        raise ConfigError(f"{config.name} is not supported with streaming (it needs "
                          "per-sample gradients of the whole model)")
    if getattr(config, "stages", 1) > 1:
        raise ConfigError("correction stages (--stages > 1) are not supported with streaming")
    if getattr(config, "remap", None) == "loss-aware":
        raise ConfigError("the loss-aware int8 remap is not supported with streaming; use "
                          "--remap classic")
    outside = [n for n in targets if block_index(n, prefix) is None]
    if outside:
        raise ConfigError(f"{outside[0]} is outside the decoder blocks; streaming compresses "
                          "block layers only")


class _StreamRun:
    """The steps of one streamed compression, each resumable from the work folder.

    The activations entering block i are the files acts/i/<batch>; each step writes the
    next block's and deletes the ones no later step reads.
    """

    def __init__(self, sm: StreamedModel, work: WorkFolder, config: MethodConfig | None,
                 targets: dict[str, nn.Linear], batches: list[torch.Tensor],
                 grad_batches: int = 0) -> None:
        self.sm, self.work, self.config, self.targets = sm, work, config, targets
        self.batches, self.grad_batches = batches, grad_batches
        self.idle_steps = 0  # lockstep KL draw steps this process has no batch at
        self.by_block: dict[int, list[str]] = {}
        for name in targets:
            self.by_block.setdefault(block_index(name, sm.prefix), []).append(name)
        self.sources = kwarg_sources(sm.model, len(sm.blocks))
        self._kwargs: list[dict] | None = None

    @property
    def spec(self):
        return method_spec(self.config.name)

    # -- activations ---------------------------------------------------------------------

    def kwargs(self) -> list[dict]:
        """The keyword arguments each block gets, per batch. The first call loads the
        embeddings, captures every batch's first-block input (written to acts/0 unless
        already committed) and releases the embeddings again."""
        if self._kwargs is not None:
            return self._kwargs
        sm, work = self.sm, self.work
        needed = [sm.blocks[i] for i in range(max(self.sources))]  # run before the last capture
        self._kwargs = []
        with sm.parts(sm.outside(skip_head=True) + needed):
            for b, ids in enumerate(self.batches):
                (hidden, kwargs), = capture_block_inputs(sm.model, sm.blocks, [ids])
                self._kwargs.append(kwargs)
                if not work.done("capture"):
                    if not torch.isfinite(hidden).all():
                        raise CalibrationError("non-finite (NaN/inf) activations at the "
                                               "input of the first decoder block")
                    save_tensors(work.file("acts", 0, b), {"h": hidden})
        work.commit(capture=1)
        return self._kwargs

    def acts(self, index: int, b: int) -> torch.Tensor:
        """The input of block ``index`` on batch ``b``."""
        return load_tensors(self.work.file("acts", index, b), self.sm.device)["h"]

    def run(self, block: nn.Module, index: int, b: int,
            hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Runs ``block`` on batch ``b`` (its stored input unless ``hidden`` is given)."""
        hidden = self.acts(index, b) if hidden is None else hidden
        out = block(hidden, **self._kwargs[b][self.sources[index]])
        return out[0] if isinstance(out, (tuple, list)) else out

    def forward(self, block: nn.Module, index: int) -> None:
        """Writes ``block``'s outputs on every batch as the next block's inputs."""
        with torch.no_grad():
            for b in range(len(self.batches)):
                save_tensors(self.work.file("acts", index + 1, b),
                             {"h": self.run(block, index, b)})

    def block_stats(self, block, index, names, write_next: bool
                    ) -> dict[str, linalg.SecondMoment]:
        """Runs the block on every batch with input hooks on ``names``; ``write_next``
        also writes its outputs as the next block's inputs."""
        with InputMomentHooks({n: self.targets[n] for n in names}) as hooks, torch.no_grad():
            for b in range(len(self.batches)):
                hooks.new_batch()
                out = self.run(block, index, b)
                if write_next:
                    save_tensors(self.work.file("acts", index + 1, b), {"h": out})
        return hooks.stats

    # -- resuming ----------------------------------------------------------------------

    def recover(self, mode: str) -> None:
        """Checks the work files that the committed steps left for the steps still to run
        (``mode``: see :func:`_mode`): each must exist, and its header and size must be
        whole. A damaged or missing one is logged with a warning naming it, and the
        progress goes back to the last step that can recompute it: the step before it for
        an activation of the forward pass or a block shard written from stored factors,
        the start otherwise (the inputs of other steps are deleted once used). Side
        effects: commits the rolled-back progress or deletes the work folder; under
        torchrun every process starts over unless all kept the same steps.
        """
        damaged = [(path, problem, back) for path, back in self._resume_files(mode)
                   if (problem := safetensors_problem(path))]
        for path, problem, _ in damaged:
            logger.warning("work file %s is damaged (%s); recomputing its step", path, problem)
        backs = [back for _, _, back in damaged]
        if None in backs:
            logger.warning("starting over: the damaged work files cannot be recomputed from "
                           "what is left in %s", self.work.path)
            self.work.start_over()
        elif backs:
            self._roll_back(*min(backs, key=lambda back: back[1]))
        if distributed.world()[1] > 1 and not distributed.agree(self.work.steps()):
            logger.warning("the processes kept different steps after checking their work "
                           "files; starting over")
            self.work.start_over()

    def _roll_back(self, step: str, count: int) -> None:
        """Commits ``step=count`` (``forward`` or ``written``), dropping the module results
        of the blocks that will be written again."""
        updates: dict = {step: count}
        if step == "written":
            kept = sum(len(self.by_block.get(i, [])) for i in range(count))
            updates["results"] = self.work.progress.get("results", [])[:kept]
        self.work.commit(**updates)

    def _resume_files(self, mode: str) -> list[tuple[Path, tuple[str, int] | None]]:
        """The work files the committed progress relies on, each with the step (name,
        count) to go back to when it is damaged, or None to start over."""
        work, blocks = self.work, len(self.sm.blocks)
        captured = work.done("capture") > 0
        if mode == "backward" and not work.done("head"):  # forward pass: acts/i from acts/i-1
            return [(f, ("forward", i - 1) if i else None)
                    for i in range(work.done("forward") + 1 if captured else 0)
                    for f in self._act_files(i)]
        if mode == "backward" and work.done("backward") < blocks:  # the block-wise backward
            left = blocks - work.done("backward")  # blocks 0 .. left-1 are still to go
            files = [f for i in range(left) for f in self._act_files(i)]
            files += [work.where("grads", left, b) for b in range(self.grad_batches)]
            return [(f, None) for f in files + self._factor_files(range(left, blocks))]
        if mode == "forward" and work.done("stored") < blocks:  # SVD-LLM v2's decompositions
            acts = self._act_files(work.done("stored")) if captured else []
            return [(f, None) for f in acts + self._factor_files(range(work.done("stored")))]
        if mode != "uniform":  # every factor is stored: blocks are written from them
            return ([(f, None) for f in self._factor_files(range(blocks))]
                    + self._block_files(rewritable=True))
        if not (captured and self.config.needs_input_stats):  # blocks need no activations
            return self._block_files(rewritable=True)
        written = work.done("written")  # uniform ranks from input statistics
        acts = self._act_files(written) if written < blocks else []
        return [(f, None) for f in acts] + self._block_files(rewritable=False)

    def _act_files(self, index: int) -> list[Path]:
        return [self.work.where("acts", index, b) for b in range(len(self.batches))]

    def _factor_files(self, indices: range) -> list[Path]:
        """The stored factor files of this process's targets in blocks ``indices``."""
        return [self.work.where("factors", name) for i in indices
                for name in distributed.mine(self.by_block.get(i, []))]

    def _block_files(self, rewritable: bool) -> list[tuple[Path, tuple[str, int] | None]]:
        """The block shards written so far (process 0 writes them), each with the step to
        go back to when it is damaged: rewriting it when ``rewritable``."""
        if distributed.world()[0] != 0:
            return []
        return [(self.work.where("blocks", f"block-{i:05d}"), ("written", i) if rewritable
                 else None) for i in range(self.work.done("written"))]

    # -- writing the compressed blocks -------------------------------------------------

    def write_blocks(self, ranks: dict, plans: dict, stored: bool) -> None:
        """For each block not yet written: loads it, factorizes its targets at ``ranks``
        (from its input statistics, or from the factors an earlier step ``stored``),
        writes its shard and, when statistics are gathered here, the next block's inputs
        (computed after compression with ``config.sequential``). Commits every block."""
        sm, work, config = self.sm, self.work, self.config
        needs_acts = config.needs_input_stats and not stored
        results = work.progress.setdefault("results", [])
        if needs_acts:
            self.kwargs()
        for index in tqdm(range(work.done("written"), len(sm.blocks)),
                          desc=f"{config.name} blocks (streamed)", unit="block"):
            block = sm.block(index)
            names = self.by_block.get(index, [])
            after = config.sequential and names  # the next inputs come from the new block
            stats = self.block_stats(block, index, names, not after) if needs_acts else {}
            distributed.sum_moments(stats)
            decompose = functools.partial(self._decompose_owned, set(distributed.mine(names)),
                                          stats, stored)
            with torch.no_grad():
                done = _factorize(sm.model, {n: self.targets[n] for n in names}, ranks,
                                  decompose, plans)
            for name in names:
                results.append(asdict(done[name]))
                if ranks[name] is not None:
                    self.targets[name].to("meta")  # swapped out: free its weight
            if needs_acts and after:
                self.forward(block, index)
            if distributed.world()[0] == 0:  # every process holds the same block
                save_tensors(work.file("blocks", f"block-{index:05d}"),
                             _block_state(sm, index, ranks))
            work.commit(written=index + 1, results=results)
            work.drop("acts", index)
            sm.release(block)

    def _decompose_owned(self, owned: set[str], stats: dict, stored: bool, name: str):
        """The decomposition of ``name`` when this process owns it (else None): its stored
        factors, or computed from its block's statistics."""
        if name not in owned:
            return None
        if stored:
            return StoredFactors.load(self.work, name)
        return self.spec.decompose(self.config, self.targets[name].weight,
                                   _last_use(stats, name), None)

    # -- methods that decompose everything first, then allocate -------------------------

    def store_by_forward(self) -> None:
        """SVD-LLM v2: decomposes every target from its block's input statistics and
        stores the factors, one block per committed step."""
        sm, work = self.sm, self.work
        self.kwargs()
        for index in tqdm(range(work.done("stored"), len(sm.blocks)),
                          desc=f"{self.config.name} decompose (streamed)", unit="block"):
            block = sm.block(index)
            names = self.by_block.get(index, [])
            stats = self.block_stats(block, index, names, write_next=True)
            distributed.sum_moments(stats)
            with torch.no_grad():
                for name in distributed.mine(names):
                    moment = _last_use(stats, name)
                    decomposition = self.spec.decompose(self.config, self.targets[name].weight,
                                                        moment, None)
                    StoredFactors.save(work, name, decomposition, None, moment.count)
                    del decomposition, moment
            work.commit(stored=index + 1)
            work.drop("acts", index)
            sm.release(block)

    def store_by_backward(self, scoring: bool) -> None:
        """Zero-sum / IO-SVD: forward through every block keeping its inputs on disk, loss
        and KL seed vectors at the head, then a block-wise backward from the top that
        gathers each block's input statistics, loss gradients and output metric,
        decomposes its targets and stores their factors and component scores."""
        config = self.config
        self.weight_grads = config.needs_loss_gradients and scoring
        self.seeds = config.top_k if config.needs_output_stats and config.kl_mode == "exact" \
            else int(config.needs_output_stats)
        self.kwargs()
        self._forward_all()
        self._head_vectors()
        sm, work = self.sm, self.work
        for index in tqdm(range(len(sm.blocks) - 1 - work.done("backward"), -1, -1),
                          desc=f"{config.name} backward (streamed)", unit="block"):
            block = sm.block(index)
            names = self.by_block.get(index, [])
            stats, metric, grads = self._backward_block(block, index, names)
            with torch.no_grad():
                for name in distributed.mine(names):
                    moment = _last_use(stats, name)
                    decomposition = self.spec.decompose(config, self.targets[name].weight,
                                                        moment, _last_use(metric, name))
                    score = (self.spec.score(config, decomposition, grads.pop(name, None))
                             if scoring else None)
                    StoredFactors.save(work, name, decomposition, score, moment.count)
                    del decomposition, moment
            work.commit(backward=len(sm.blocks) - index)
            work.drop("grads", index + 1)
            work.drop("acts", index)
            sm.release(block)

    def _forward_all(self) -> None:
        """Runs the original blocks on every batch, keeping every block's inputs."""
        sm, work = self.sm, self.work
        for index in tqdm(range(work.done("forward"), len(sm.blocks)), desc="forward (streamed)",
                          unit="block"):
            block = sm.block(index)
            self.forward(block, index)
            work.commit(forward=index + 1)
            sm.release(block)

    def _head_vectors(self) -> None:
        """Loss and KL seed vectors at the last block's output, per gradient batch."""
        sm, work, config = self.sm, self.work, self.config
        if work.done("head"):
            return
        top = len(sm.blocks)
        generator = torch.Generator().manual_seed(getattr(config, "seed", 0))

        def draws(probs):  # every process replays the draws in global batch order
            return fisher.kl_draws(probs, config.kl_mode, generator)

        total, count = 0.0, 0
        with sm.parts(sm.outside(skip_head=False)):
            for b in tqdm(range(self.grad_batches), desc="head (streamed)", unit="batch"):
                ids = self.batches[b].to(sm.device)
                hidden = self.acts(top, b).requires_grad_(True)
                with torch.enable_grad():
                    logits = head_logits(sm, hidden)[:, :-1]
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                           reduction="sum")
                    if not torch.isfinite(loss):
                        raise CalibrationError("calibration loss is not finite; the model "
                                               "produced NaN/inf")
                    vectors = {}
                    if self.weight_grads:
                        vectors["loss"], = torch.autograd.grad(loss, hidden, retain_graph=True)
                    if self.seeds:
                        seeds = fisher.kl_seeds(
                            logits.detach(), config.top_k, config.kl_mode,
                            draw=lambda probs: distributed.lockstep(probs, draws))
                        for k, seed in enumerate(seeds):
                            vectors[f"seed{k}"], = torch.autograd.grad(
                                logits, hidden, seed.to(logits.dtype), retain_graph=True)
                total += loss.item()
                count += ids[:, 1:].numel()
                save_tensors(work.file("grads", top, b), vectors or {"none": torch.zeros(1)})
            if self.seeds:
                for _ in range(self.idle_steps):
                    distributed.lockstep(None, draws)
        total, count = distributed.sum_numbers(total, count)
        logger.info("calibration loss of the original model: %.4f", total / max(count, 1))
        work.commit(head=1, loss_tokens=count)
        work.drop("acts", top)

    def _backward_block(self, block, index, names):
        """Recomputes ``block`` on every batch: input statistics of its targets on all
        batches; on gradient batches, the loss gradients of their weights, their output
        metric and the vectors handed to the block below."""
        work = self.work
        layers = {n: self.targets[n] for n in names}
        sums = {n: torch.zeros(layer.weight.shape) for n, layer in layers.items()}
        metric = {n: linalg.SecondMoment.zeros(layer.out_features, layer.weight.device)
                  for n, layer in layers.items()} if self.seeds else {}
        weights = [layer.weight for layer in layers.values()]
        for w in weights:
            w.requires_grad_(self.weight_grads)
        with InputMomentHooks(layers) as hooks, _KeptOutputs(layers) as kept:
            for b in range(len(self.batches)):
                hooks.new_batch()
                wanted = b < self.grad_batches
                hidden = self.acts(index, b).requires_grad_(wanted)
                with torch.set_grad_enabled(wanted):
                    out = self.run(block, index, b, hidden)
                if not wanted:
                    continue
                upstream = load_tensors(work.file("grads", index + 1, b), self.sm.device)
                below = {}
                if self.weight_grads:
                    got = torch.autograd.grad(out, [hidden, *weights], upstream["loss"],
                                              retain_graph=True)
                    below["loss"] = got[0]
                    for name, g in zip(layers, got[1:], strict=True):
                        sums[name] += g.float().cpu()
                for k in range(self.seeds):
                    outs = [kept.outputs[n] for n in layers]
                    got = torch.autograd.grad(out, [hidden, *outs], upstream[f"seed{k}"],
                                              retain_graph=True)
                    below[f"seed{k}"] = got[0]
                    for name, g in zip(layers, got[1:], strict=True):
                        if not torch.isfinite(g).all():
                            raise CalibrationError(f"non-finite KL pseudo-gradient at {name}")
                        metric[name].update(g, new_tokens=k == 0)
                kept.outputs.clear()
                save_tensors(work.file("grads", index, b), below or {"none": torch.zeros(1)})
        for w in weights:
            w.requires_grad_(False)
        distributed.sum_moments(hooks.stats)
        distributed.sum_moments(metric)
        distributed.sum_tensors(sums.values())
        tokens = work.progress["loss_tokens"]
        grads = {n: s / tokens for n, s in sums.items()} if self.weight_grads else {}
        return hooks.stats, metric, grads

    def select(self, rank_map: dict | None) -> tuple[dict, dict]:
        """Ranks (and int8 row plans) from the stored sigmas and scores, or ``rank_map``."""
        config = self.config
        shapes = {n: tuple(t.weight.shape) for n, t in self.targets.items()}
        if rank_map is not None:
            ranks = dict(rank_map)
        elif config.allocation == "truncation-loss":
            stored = self._stored_meta(shapes, scores=False)
            ranks = loss_balanced_ranks(shapes, {n: s[0] for n, s in stored.items()},
                                        config.ratio, round(float(stored[next(iter(stored))][1])))
        else:
            stored = self._stored_meta(shapes, scores=True)
            remap = getattr(config, "remap", None)
            ranks = global_select(shapes, {n: s[1] for n, s in stored.items()},
                                  config.ratio, config.rule, config.min_rank,
                                  cost=classic_cost if remap else kept_params).ranks
        plans = ({n: classic_plan(*shapes[n], r) for n, r in ranks.items() if r is not None}
                 if getattr(config, "remap", None) == "classic" else {})
        return ranks, plans

    def _stored_meta(self, shapes: dict, scores: bool) -> dict[str, list[torch.Tensor]]:
        """{target: [σ, scores or the token count]} from the process that stored it."""
        held = {}
        for names in self.by_block.values():
            for name in distributed.mine(names):
                meta = StoredFactors.read_meta(self.work, name)
                last = meta["scores"] if scores else torch.tensor([float(meta["tokens"])])
                held[name] = [meta["sigma"], last]
        return distributed.share(held, {n: [(min(m, k),), (min(m, k),) if scores else (1,)]
                                        for n, (m, k) in shapes.items()})


def _last_use(stats: dict[str, linalg.SecondMoment], name: str
              ) -> linalg.SecondMoment | None:
    """Pops ``name``'s statistics; when no other module shares them they are marked
    consumable, so that their mean is computed in place of the sums."""
    moment = stats.pop(name, None)
    if moment is not None and not any(other is moment for other in stats.values()):
        moment.consumable = True
    return moment


class _KeptOutputs:
    """Forward hooks that keep each layer's latest output (for the output metric)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers, self.outputs, self._handles = layers, {}, []

    def __enter__(self) -> _KeptOutputs:
        def keep(name):
            def hook(module, args, output):
                if output.requires_grad:
                    self.outputs[name] = output
            return hook

        self._handles = [layer.register_forward_hook(keep(name))
                         for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        self.outputs.clear()
        for handle in self._handles:
            handle.remove()


@dataclass
class StoredFactors:
    """A decomposition as stored in the work folder: its factors at full rank (float32),
    ready to be cut, and its singular values. Duck-types ``linalg.Decomposition`` for
    ``pipeline._cut``."""

    w_u: torch.Tensor
    w_v: torch.Tensor
    sigma: torch.Tensor

    def truncation_loss(self, rank: int) -> float:
        return float(self.sigma[rank:].square().sum())

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_u[:, :rank], self.w_v[:rank]

    @staticmethod
    def save(work: WorkFolder, name: str, decomposition: linalg.Decomposition,
             scores: torch.Tensor | None, tokens: int) -> None:
        w_u, w_v = decomposition.factors(decomposition.sigma.numel())
        tensors = {"w_u": w_u.float(), "w_v": w_v.float(), "sigma": decomposition.sigma,
                   "tokens": torch.tensor([tokens])}
        if scores is not None:
            tensors["scores"] = scores
        save_tensors(work.file("factors", name), tensors)

    @classmethod
    def load(cls, work: WorkFolder, name: str) -> StoredFactors:
        t = load_tensors(work.file("factors", name))
        return cls(t["w_u"].double(), t["w_v"].double(), t["sigma"])

    @staticmethod
    def read_meta(work: WorkFolder, name: str) -> dict:
        with safe_open(work.file("factors", name), framework="pt") as f:
            keys = set(f.keys())
            return {"sigma": f.get_tensor("sigma"), "tokens": int(f.get_tensor("tokens")[0]),
                    "scores": f.get_tensor("scores") if "scores" in keys else None}


def _block_state(sm: StreamedModel, index: int, ranks: dict) -> dict[str, torch.Tensor]:
    """The state dict of compressed block ``index`` under its qualified names, with the
    one-element markers of its factorized modules."""
    prefix = f"{sm.prefix}.{index}."
    state = dict(sm.blocks[index].state_dict(prefix=prefix))
    for name, rank in ranks.items():
        if rank and name.startswith(prefix):
            state[name + MARKER_SUFFIX] = torch.zeros(1, dtype=torch.int8)
    return state


#: Outside tensors are grouped into shards of at most this many bytes.
OUTSIDE_SHARD_BYTES = 1 << 28


def _assemble(sm: StreamedModel, work: WorkFolder, output: Path, tokenizer) -> None:
    """Writes the output folder atomically: the block shards (hard-linked from the work
    folder), the tensors outside the blocks (copied from the source one shard at a time),
    the index, config.json and the tokenizer; then deletes the work folder."""
    blocks_dir = work.path / "blocks"
    block_names = set(sm.blocks.state_dict(prefix=sm.prefix + ".")) | {
        n for n in sm.reader.weight_map if block_index(n, sm.prefix) is not None}
    outside = [n for n in sm.model.state_dict() if n not in block_names and n in sm.reader]

    def write(tmp: Path) -> None:
        weight_map: dict[str, str] = {}
        for shard in sorted(blocks_dir.glob("block-*.safetensors")):
            os.link(shard, tmp / f"model-{shard.name}")
            with safe_open(shard, framework="pt") as f:
                weight_map.update({k: f"model-{shard.name}" for k in f.keys()})
        group: dict[str, torch.Tensor] = {}
        for name in outside + [None]:
            size = sum(t.numel() * t.element_size() for t in group.values())
            if group and (name is None or size >= OUTSIDE_SHARD_BYTES):
                shard = f"model-outside-{len(set(weight_map.values())):05d}.safetensors"
                save_file({k: v.contiguous() for k, v in group.items()}, tmp / shard)
                weight_map.update(dict.fromkeys(group, shard))
                group = {}
            if name is not None:
                group[name] = sm.reader.get(name, sm.dtype, "cpu")
        index = {"metadata": {"format": "pt"}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = sm.model.config
        config.dtype = sm.dtype
        config.save_pretrained(tmp)
        generation = sm.folder / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, tmp / generation.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record_shard_digests(tmp)

    write_dir_atomically(output, write)


def streamed_perplexity(folder: str | Path, token_ids: torch.Tensor, seqlen: int = 2048,
                        max_windows: int | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> PerplexityResult:
    """Perplexity (``evaluation.evaluate``'s convention) of the model in ``folder``, dense
    or a rankcut checkpoint, loading one decoder block at a time.

    Side effects: activations go to a temporary folder, deleted at the end.
    """
    windows = split_windows(token_ids, seqlen, max_windows)
    sm = StreamedModel(folder, dtype, device)
    with tempfile.TemporaryDirectory(prefix="rankcut-ppl-") as tmp:
        work = WorkFolder(Path(tmp) / "ppl", "perplexity")
        run = _StreamRun(sm, work, None, {}, list(windows.split(1)))
        run.kwargs()
        for index in tqdm(range(len(sm.blocks)), desc="perplexity (streamed)", unit="block"):
            block = sm.block(index)
            run.forward(block, index)
            work.drop("acts", index)
            sm.release(block)
        nll: list[float] = []
        with sm.parts(sm.outside(skip_head=False)), torch.no_grad():
            for b, ids in enumerate(run.batches):
                logits = head_logits(sm, run.acts(len(sm.blocks), b))
                nll.extend(window_nll(logits, ids.to(sm.device)))
    return summarize(nll, seqlen - 1)
