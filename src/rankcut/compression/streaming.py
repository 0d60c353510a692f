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
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .._version import __version__
from ..architecture import (
    auto_model_class,
    block_index,
    find_decoder_blocks,
    is_vision_language,
    select_targets,
)
from ..calibration import distributed
from ..calibration.data import IGNORE, Calibration, as_calibration
from ..errors import CalibrationError, ConfigError, ModelLoadError
from ..io.checkpoint import (
    add_markers,
    record_shard_digests,
    replace_with_low_rank,
    write_dir_atomically,
)
from ..io.outputs import check_replaceable
from ..loading import check_safetensors_folder
from ..measure.evaluation import PerplexityResult, split_windows, summarize
from ..methods import MethodConfig
from ..nn.modules import LowRankLinear
from .engine import (
    BlockRun,
    CompressionReport,
    check_inputs,
    head_logits,
    outside_modules,
    rebuild_layouts,
    save_block,
)
from .pipeline import compress_blocks
from .update import UpdateConfig, apply_update, keeps_blocks, needs_block_metric
from .workfolder import (  # noqa: F401  (re-exported: streaming's public names)
    PROGRESS,
    WORK_SUFFIX,
    WorkFolder,
    load_tensors,
    return_freed_memory,
    save_tensors,
    scratch_folder,
    trim_heap,
)

logger = logging.getLogger(__name__)


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
        self._stored = {name: name for name in self.weight_map}

    def use_model_names(self, model: nn.Module) -> None:
        """Names the tensors as ``model`` does where transformers renames a checkpoint's
        keys on loading (LLaVA's ``language_model.model.*`` is ``model.language_model.*``);
        reads still use the stored names. A stored name is renamed only when the model has
        the new name and not the stored one (transformers' legacy renamings would also
        turn rankcut's ``weight_v`` into a weight-norm parametrization). Side effect:
        rekeys ``weight_map``."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model)
                     if isinstance(t, WeightRenaming)]
        if not renamings:
            return
        meta = model.state_dict()

        def model_name(stored: str) -> str:
            name = rename_source_key(stored, renamings, [], model.base_model_prefix, meta)[0]
            return name if name in meta and stored not in meta else stored

        renamed = {stored: model_name(stored) for stored in self.weight_map}
        self._stored = {name: stored for stored, name in renamed.items()}
        self.weight_map = {renamed[stored]: file for stored, file in self.weight_map.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Returns the tensor ``name`` cast to ``dtype`` on ``device``."""
        with safe_open(self.folder / self.weight_map[name], framework="pt") as f:
            tensor = f.get_tensor(self._stored[name])
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
        from transformers import AutoConfig

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
            model_class = auto_model_class(is_vision_language(config))
            self.model = model_class.from_config(config, dtype=dtype).eval()
        self.model.tie_weights()  # tied parameters become one object, loaded once
        if isinstance(entry, dict) and entry.get("quant_method") == "rankcut":
            replace_with_low_rank(self.model, entry["rank_map"], dtype, "meta",
                                  entry.get("int8_layout"))
        self.reader.use_model_names(self.model)
        self.prefix, self.blocks = find_decoder_blocks(self.model)
        self._names = {id(m): n for n, m in self.model.named_modules()}
        by_tensor: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            by_tensor.setdefault(id(param), []).append(name)
        # every name of a tied parameter, by name (parameter objects are replaced as
        # parts are loaded, released and compressed, so their ids are no key)
        self._aliases = {name: names for names in by_tensor.values() for name in names}
        self.overlay: dict[str, Path] = {}  # compressed modules outside the blocks: work files

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
        for name, _ in list(module.named_parameters(prefix=prefix)):
            aliases = self._aliases.get(name, [name])
            stored = next((a for a in aliases if a in self.overlay or a in self.reader), None)
            if stored is None:
                raise ModelLoadError(f"{name} is in none of the shards of {self.folder}")
            tensor = nn.Parameter(self.read(stored, self.dtype), requires_grad=False)
            for alias in aliases:
                self._set(alias, tensor)
        for name, buffer in list(module.named_buffers(prefix=prefix)):
            if name in self.overlay or name in self.reader:
                dtype = self.dtype if buffer.is_floating_point() else buffer.dtype
                self._set(name, self.read(name, dtype))
        for sub in module.modules():
            if isinstance(sub, LowRankLinear):
                sub.use_fast_layout_()
        return module

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One stored tensor (cast to ``dtype``, on the device): from the work files of the
        compressed modules outside the blocks, else from the shards."""
        if name in self.overlay:
            with safe_open(self.overlay[name], framework="pt", device=str(self.device)) as f:
                return f.get_tensor(name).to(dtype)
        return self.reader.get(name, dtype, self.device)

    def release(self, module: nn.Module) -> None:
        """Puts ``module``'s parameters (and their tied copies) back on the meta device,
        freeing their memory. Mutates the skeleton; a module compressed away is only
        moved to the meta device itself."""
        prefix = self._names.get(id(module))
        if prefix is not None and self.model.get_submodule(prefix) is not module:
            module.to("meta")
            return
        for name, param in list(module.named_parameters(prefix=prefix)):
            empty = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
            for alias in self._aliases.get(name, [name]):
                self._set(alias, empty)
        for name, buffer in list(module.named_buffers(prefix=prefix)):
            if name in self.reader or isinstance(self.model.get_submodule(
                    name.rpartition(".")[0]), LowRankLinear):
                self._set(name, torch.empty_like(buffer, device="meta"))

    def block(self, index: int) -> nn.Module:
        """Loads decoder block ``index`` and returns it."""
        return self.load(self.blocks[index])

    def outside(self, skip_head: bool) -> list[nn.Module]:
        """The modules outside the decoder blocks that hold parameters
        (``engine.outside_modules``)."""
        return outside_modules(self.model, self.blocks, skip_head)

    def write_block(self, work: WorkFolder, index: int, ranks: dict) -> None:
        """Writes compressed block ``index`` to its shard in ``work`` (process 0 does; every
        process holds the same block)."""
        if distributed.world()[0] == 0:
            save_block(work, "blocks", self, index, ranks)

    def keep_outside(self, work: WorkFolder, names: list[str], ranks: dict) -> None:
        """Writes each compressed module ``names`` outside the blocks to a work file (with
        its marker), reads it from there from now on and releases it."""
        for name in names:
            module = self.model.get_submodule(name)
            state = add_markers(dict(module.state_dict(prefix=name + ".")), [name])
            path = work.file("outside", name)
            save_tensors(path, state)
            self._use_outside(name, state, path)
            self.release(module)

    def restore_outside(self, work: WorkFolder, results: list[dict]) -> None:
        """After a restart: gives the compressed modules outside the blocks that ``results``
        name their empty ``LowRankLinear`` again, read from the work files."""
        outside = [r for r in results if block_index(r["name"], self.prefix) is None]
        for name in rebuild_layouts(self.model, outside, self.dtype):
            path = work.file("outside", name)
            with safe_open(path, framework="pt") as f:
                self._use_outside(name, dict.fromkeys(f.keys()), path)

    def _use_outside(self, name: str, state: dict, path: Path) -> None:
        """Reads the tensors of ``state`` from ``path``; the replaced module's names stop
        being aliases of a tied parameter."""
        self.overlay.update(dict.fromkeys(state, path))
        self._names[id(self.model.get_submodule(name))] = name
        inside = name + "."
        self._aliases = {key: [a for a in names if not a.startswith(inside)]
                         for key, names in self._aliases.items() if not key.startswith(inside)}

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




@dataclass
class StreamSettings:
    """What a streamed run was asked to do: the inputs of its fingerprint."""

    source: str
    output: str
    config: MethodConfig
    calibration: Calibration | None
    include: list[str] | None
    exclude: list[str] | None
    batch_size: int
    dtype: torch.dtype
    rank_map: dict | None
    update: UpdateConfig | None = None

    def fingerprint(self) -> str:
        """A digest of everything that determines the output; a rerun resumes only when
        it matches."""

        calib = self.calibration
        digest = hashlib.sha256()
        digest.update(json.dumps({
            "source": str(Path(self.source).resolve()), "method": self.config.name,
            "settings": self.config.settings(), "include": self.include,
            "exclude": self.exclude, "batch_size": self.batch_size, "dtype": str(self.dtype),
            "rank_map": self.rank_map, "version": __version__,
            "update": self.update.settings() if self.update is not None else None,
            "calib_shape": None if calib is None else list(calib.shape),
        }, sort_keys=True).encode())
        if calib is not None:
            for ids in (calib.input_ids, calib.labels):
                digest.update(ids.to(torch.int64).numpy().tobytes())
            for image in calib.images:
                for key, value in sorted((image or {}).items()):
                    digest.update(key.encode() + value.float().contiguous().numpy().tobytes())
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
    update: UpdateConfig | None = None,
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
        update: the closed-form refit or the block refinement after truncation
            (``update.BLOCKWISE``), run block
            by block too, or None.
        tokenizer: saved into ``output`` when given.
        dtype: dtype of the loaded weights and of the output.
        device: where blocks are computed.

    Returns:
        The report, as ``pipeline.compress`` gives it.

    Raises:
        ConfigError: the LoRA update (it trains the whole model in memory), or as
            ``pipeline.compress``.
        ModelLoadError, CalibrationError, UnsupportedModelError: as ``pipeline.compress``.
    """
    if update is not None and update.whole_model:
        raise ConfigError(f"the {update.name} update is not supported with streaming: lora "
                          "trains the whole model at once; use the refit or block update "
                          "(block by block), or compress in memory")
    calibration = None if calibration is None else as_calibration(calibration)
    sm = StreamedModel(source, dtype, device)
    output = Path(output)
    check_replaceable(output)  # now, not after the whole run
    targets = select_targets(sm.model, include, exclude)
    check_inputs(sm.model, config, targets, calibration, rank_map, update)
    settings = StreamSettings(str(source), str(output), config, calibration, include,
                              exclude, batch_size, dtype, rank_map, update)
    rank, size = distributed.world()
    work = WorkFolder(output, settings.fingerprint(), f"-{rank}-of-{size}" if size > 1 else "")
    report = CompressionReport(method=config.name, settings=config.settings())
    start = time.perf_counter()
    run = compress_blocks(sm, work, report, config, targets, calibration, batch_size,
                          rank_map, refit=keeps_blocks(update),
                          block_metric=needs_block_metric(update))
    if update is not None:
        report.update = apply_update(run, update, calibration, batch_size)
    report.seconds = time.perf_counter() - start
    sm.model.config.quantization_config = report.quantization_config()
    if rank == 0:  # under torch.distributed, process 0 writes; the others wait
        _assemble(sm, work, output, tokenizer)
    distributed.barrier()
    shutil.rmtree(work.path, ignore_errors=True)
    return report



#: Outside tensors are grouped into shards of at most this many bytes.
OUTSIDE_SHARD_BYTES = 1 << 28


def _assemble(sm: StreamedModel, work: WorkFolder, output: Path, tokenizer) -> None:
    """Writes the output folder atomically: the block shards (hard-linked from the work
    folder), the tensors outside the blocks (copied from the source one shard at a time),
    the index, config.json and the tokenizer; then deletes the work folder."""
    blocks_dir = work.path / "blocks"
    block_names = set(sm.blocks.state_dict(prefix=sm.prefix + ".")) | {
        n for n in sm.reader.weight_map if block_index(n, sm.prefix) is not None}
    outside = [n for n in sm.model.state_dict() if n not in block_names and n in sm.reader
               and n not in sm.overlay]
    outside += list(sm.overlay)  # compressed modules outside the blocks, with their markers

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
            if name in sm.overlay:  # as stored (int8 rows stay int8)
                group[name] = load_tensors(sm.overlay[name])[name]
            elif name is not None:
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
    with _through_blocks(sm, list(windows.split(1)), "perplexity (streamed)") as run, \
            sm.parts(sm.outside(skip_head=False)), torch.no_grad():
        nll = [_window_nll(sm, run.acts(len(sm.blocks), b), ids.to(sm.device))
               for b, ids in enumerate(run.batches)]
    return summarize(nll, seqlen - 1)


@contextlib.contextmanager
def _through_blocks(sm: StreamedModel, batches: list, desc: str):
    """Runs ``batches`` (one sample each) through every block of ``sm``, one block loaded
    at a time, and yields the block run, whose ``acts(len(sm.blocks), b)`` are the last
    block's outputs. Side effects: activations go to a temporary folder, deleted at the
    end."""
    with scratch_folder("rankcut-ppl-") as tmp:
        work = WorkFolder(tmp / "ppl", desc)
        run = BlockRun(sm, work, None, {}, batches)
        run.kwargs()
        for index in tqdm(range(len(sm.blocks)), desc=desc, unit="block"):
            block = sm.block(index)
            run.forward(block, index)
            work.drop("acts", index)
            sm.release(block)
        yield run


def streamed_caption_perplexity(folder: str | Path, processor, records: list[dict],
                                dtype: torch.dtype = torch.float32,
                                device: str | torch.device = "cpu") -> PerplexityResult:
    """``evaluation.caption_perplexity`` of the vision-language model in ``folder``, dense or
    a rankcut checkpoint, loading one decoder block at a time (the vision side with the
    embeddings, while the first block's inputs are captured).

    Side effects: activations go to a temporary folder, deleted at the end.

    Raises:
        CalibrationError: no record has any text, or an image cannot be read.
    """
    from ..calibration.image_data import encode_image_text

    samples = [sample for sample in (encode_image_text(processor, record).as_calibration()
                                     for record in records) if sample.predicted]
    if not samples:
        raise CalibrationError("no image-text record has any text to score")
    sm = StreamedModel(folder, dtype, device)
    top = len(sm.blocks)
    with _through_blocks(sm, samples, "caption perplexity (streamed)") as run, \
            sm.parts(sm.outside(skip_head=False)), torch.no_grad():
        nll = [float(F.cross_entropy(head_logits(sm, run.acts(top, b))[0, :-1].float(),
                                     sample.targets[0].to(sm.device), ignore_index=IGNORE,
                                     reduction="sum"))
               for b, sample in enumerate(samples)]
    return summarize(nll, tokens=sum(sample.predicted for sample in samples))


#: Positions of a window whose logits the streamed evaluation computes at once.
HEAD_CHUNK = 512


def _window_nll(sm: StreamedModel, hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL of one window ``ids`` [1, L] from its last block's output,
    the head run on ``HEAD_CHUNK`` positions at a time (a 2048-token window's logits alone
    take 400 MB with a 49k vocabulary)."""
    total = 0.0
    for start in range(0, ids.shape[1] - 1, HEAD_CHUNK):
        end = min(start + HEAD_CHUNK, ids.shape[1] - 1)
        logits = head_logits(sm, hidden[:, start:end])[0]
        total += float(F.cross_entropy(logits.float(), ids[0, start + 1:end + 1],
                                       reduction="none").double().sum())
    return total
