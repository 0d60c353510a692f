"""Saving and loading compressed models as ordinary Hugging Face folders.

Layout (DESIGN.md §3): ``config.json`` whose ``quantization_config`` carries
``quant_method: "rankcut"`` and the per-module rank map, sharded ``*.safetensors`` with
``<module>.weight_u`` / ``<module>.weight_v`` (plus ``weight_u_int8``, ``weight_u_scale``,
``weight_v_int8``, ``weight_v_scale`` for modules with int8 rows, whose layout is in
``quantization_config["int8_layout"]``), and the tokenizer files.

Each factorized module also stores a one-element marker under its dense name
``<module>.weight``. A transformers without rankcut imported skips the unknown
``quant_method`` and would otherwise fill the missing dense weights with random values; the
marker's shape mismatch makes that load fail loudly instead. With rankcut imported, the
registered quantizer builds ``LowRankLinear`` modules from the rank map and ignores it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import CheckpointError
from ..nn.modules import LowRankLinear
from .outputs import leftover_target, write_dir_atomically

logger = logging.getLogger(__name__)

RUN_FILE = "rankcut_run.json"  # `rankcut compress` writes its figures next to the checkpoint
BENCH_FILE = "rankcut_bench.json"  # `rankcut bench` writes its speed table there

QUANT_METHOD = "rankcut"
SUPPORTED_FORMATS = (1,)
MARKER_SUFFIX = ".weight"
#: ``quantization_config`` key of the ``{shard file: sha256}`` written at save time.
DIGESTS_KEY = "shard_sha256"


def marker_key(name: str) -> str:
    """The state-dict key of module ``name``'s marker: a one-element int8 tensor that records
    in the shards themselves that the module is stored low-rank."""
    return name + MARKER_SUFFIX


def add_markers(state: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Adds the marker of each factorized module in ``names`` to ``state``; returns it."""
    for name in names:
        state[marker_key(name)] = torch.zeros(1, dtype=torch.int8)
    return state


class RankcutConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a rankcut checkpoint, as transformers sees it.

    Args:
        rank_map: {module name: rank, or None for a module kept dense}.
        format_version: checkpoint format version.
        **kwargs: the rest of the entry (method, settings, ratios, versions), kept verbatim.
    """

    def __init__(self, rank_map: dict | None = None, format_version: int = 1, **kwargs) -> None:
        self.quant_method = QUANT_METHOD
        self.rank_map = dict(rank_map or {})
        self.format_version = format_version
        for key, value in kwargs.items():
            if key != "quant_method":
                setattr(self, key, value)

    def to_dict(self) -> dict:
        """Returns the JSON-ready entry, ``quant_method`` first."""
        return {"quant_method": QUANT_METHOD, **{k: v for k, v in self.__dict__.items()
                                                 if k != "quant_method"}}


class RankcutHfQuantizer(HfQuantizer):
    """Rebuilds ``LowRankLinear`` modules from the rank map before the weights are loaded."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        dtype = kwargs.get("dtype") or model.dtype
        replace_with_low_rank(model, self.quantization_config.rank_map, dtype=dtype,
                              device="meta",
                              int8_layout=getattr(self.quantization_config, "int8_layout", None))
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        markers = {re.escape(marker_key(name)) + "$"
                   for name, rank in self.quantization_config.rank_map.items() if rank}
        model._keys_to_ignore_on_load_unexpected = ignore | markers
        for name, rank in self.quantization_config.rank_map.items():
            if rank and "." in name:  # a parent's weight init would read the child's .weight
                model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            if isinstance(module, LowRankLinear):
                module.use_fast_layout_()
        return model

    def update_weight_conversions(self, weight_conversions, model):
        """Drops transformers' legacy weight-norm renaming of ``*.weight_v`` (to
        ``parametrizations.weight.original1``), which would take rankcut's W_v factors for
        weight-norm tensors; VLM classes apply it when they load."""
        kept = [t for t in weight_conversions
                if ".weight_v" not in (getattr(t, "source_patterns", None) or [])]
        return super().update_weight_conversions(kept, model)

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register_with_transformers() -> None:
    """Registers the rankcut quantizer and config with transformers (idempotent).

    Side effect: adds ``"rankcut"`` to transformers' quantizer registries, so that
    ``AutoModelForCausalLM.from_pretrained`` rebuilds rankcut checkpoints.
    """
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, RankcutConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, RankcutHfQuantizer)


def replace_with_low_rank(model: nn.Module, rank_map: dict, dtype: torch.dtype,
                          device: str | torch.device = "meta",
                          int8_layout: dict | None = None) -> None:
    """Swaps each ``nn.Linear`` named in ``rank_map`` with a rank entry for an empty
    ``LowRankLinear`` of that rank (and of its ``int8_layout`` entry, when it has int8
    rows). Mutates ``model``.

    Raises:
        CheckpointError: a named module is missing or not an ``nn.Linear``, or its int8
            layout does not fit its rank.
    """
    int8_layout = int8_layout or {}
    for name, rank in rank_map.items():
        if not rank:
            continue
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise CheckpointError(f"rank map names {name}, which the model does not have") from err
        if not isinstance(layer, nn.Linear):
            raise CheckpointError(f"rank map names {name}, a {type(layer).__name__}, not a Linear")
        try:
            low_rank = LowRankLinear(layer.in_features, layer.out_features, int(rank),
                                     bias=layer.bias is not None, device=device, dtype=dtype,
                                     **int8_layout.get(name, {}))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"bad int8 layout for {name}: {err}") from err
        model.set_submodule(name, low_rank)


def save_pretrained(model: nn.Module, path: str | Path, tokenizer=None,
                    max_shard_size: str = "2GB") -> Path:
    """Writes a compressed model as a Hugging Face folder, atomically.

    Everything is written to a temporary sibling folder which is renamed into place at the
    end, so an interrupted save never leaves a folder that looks complete; an existing
    folder at ``path`` is replaced only once the new one is whole.

    Args:
        model: a model compressed by ``rankcut.compress`` (or loaded from a checkpoint).
        path: the output folder.
        tokenizer: saved alongside when given.
        max_shard_size: largest safetensors shard.

    Returns:
        The output folder.

    Raises:
        CheckpointError: the model carries no rankcut ``quantization_config``, or the
            latent value cache (an inference-time switch) is on.
    """
    from ..nn.valuecache import uses_latent_values

    check_saveable(model)
    path = Path(path)
    entry = _rankcut_entry(model.config)
    if entry is None:
        raise CheckpointError("model has no rankcut quantization_config; compress it first")
    if uses_latent_values(model):
        raise CheckpointError("the latent value cache is on; call "
                              "rankcut.nn.valuecache.disable_latent_values(model) before saving")
    state = add_markers({k: v.contiguous() for k, v in model.state_dict().items()},
                        [name for name, rank in entry["rank_map"].items() if rank])
    model.config.quantization_config = entry

    entry.pop(DIGESTS_KEY, None)  # a loaded checkpoint's digests describe its own shards

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record_shard_digests(tmp)

    return write_dir_atomically(path, write)


def file_sha256(path: Path) -> str:
    """Returns the hex SHA-256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def record_shard_digests(folder: Path) -> dict[str, str]:
    """Hashes every safetensors shard of the checkpoint in ``folder`` and records
    ``{file name: sha256}`` under ``quantization_config["shard_sha256"]`` in its config.json.

    Side effects: rewrites ``folder/config.json``. Returns the digests.
    """
    digests = {shard.name: file_sha256(shard) for shard in _shard_files(folder)}
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["quantization_config"][DIGESTS_KEY] = digests
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return digests


def verify_shard_digests(path: Path, entry: dict) -> int | None:
    """Checks every shard of the checkpoint at ``path`` against the digests in ``entry``.

    Returns:
        The number of shards verified, or None when the checkpoint records no digests
        (written by a rankcut before they existed).

    Raises:
        CheckpointError: a shard is missing or extra, or its bytes do not match its digest.
    """
    digests = entry.get(DIGESTS_KEY)
    if digests is None:
        logger.warning("%s records no shard digests (an older rankcut wrote it); its tensors "
                       "are not verified", path)
        return None
    shards = _shard_files(path)
    if {shard.name for shard in shards} != set(digests):
        raise CheckpointError(f"{path}: its shards {sorted(s.name for s in shards)} are not the "
                              f"ones recorded at save time {sorted(digests)}")
    for shard in shards:
        if file_sha256(shard) != digests[shard.name]:
            raise CheckpointError(f"shard {shard} does not match the sha256 recorded when it "
                                  "was saved: the file was corrupted or modified")
    return len(shards)


def check_saveable(model: nn.Module) -> None:
    """Raises now what ``save_pretrained`` would raise after the whole run: a model still
    attached to another transformers quantizer (bitsandbytes, a GGUF loaded packed, ...),
    whose models transformers refuses to save. The CLI calls it right after loading.

    Raises:
        CheckpointError: the model carries a quantizer other than rankcut's.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or isinstance(quantizer, RankcutHfQuantizer):
        return
    method = getattr(quantizer.quantization_config, "quant_method", "another")
    raise CheckpointError(
        f"the model is loaded through transformers' {getattr(method, 'value', method)} "
        "quantizer, and such a model cannot be saved; load it with dense weights "
        "(rankcut.load_model dequantizes a .gguf file)")


def _rankcut_entry(config) -> dict | None:
    entry = getattr(config, "quantization_config", None)
    if entry is not None and not isinstance(entry, dict):
        entry = entry.to_dict()
    return entry if entry and entry.get("quant_method") == QUANT_METHOD else None


def validate_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """Checks that a folder is a whole, untampered rankcut checkpoint before any weight is
    loaded.

    Args:
        path: the checkpoint folder.
        verify: hash every shard against the digests recorded at save time (reads every
            byte once; ``False`` skips it for a checkpoint the caller trusts).

    Returns:
        The ``quantization_config`` entry.

    Raises:
        CheckpointError: the folder, config.json or a shard is missing, unreadable or
            truncated; the folder is the leftover of an interrupted save; the format is not
            one this version reads; a shard's bytes do not match its digest; or the rank
            map disagrees with the stored tensor shapes or with ``rank_map.json``.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    unfinished = leftover_target(path)
    if unfinished:
        raise CheckpointError(f"{path} is the unfinished folder of an interrupted save of "
                              f"{unfinished}, not a checkpoint")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} has no config.json; not a complete checkpoint") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / 'config.json'} is corrupt: {err}") from err
    entry = (config.get("quantization_config") or {}) if isinstance(config, dict) else {}
    if not isinstance(entry, dict) or entry.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} is not a rankcut checkpoint (no rankcut entry in config)")
    if entry.get("format_version") not in SUPPORTED_FORMATS:
        raise CheckpointError(
            f"{path} has rankcut format_version {entry.get('format_version')!r}; "
            f"this rankcut reads {SUPPORTED_FORMATS}"
        )
    for shard in _shard_files(path):
        _check_shard(shard)
    if verify:
        verify_shard_digests(path, entry)
    check_rank_map_against_shapes(path, entry)
    return entry


def check_rank_map_against_shapes(path: Path, entry: dict) -> None:
    """Checks the checkpoint's rank map against its tensors (headers only) and against the
    ``rank_map.json`` beside it, when there is one.

    Raises:
        CheckpointError: a rank that is not a positive integer or null, a factorized module
            whose stored factors are missing or do not have its rank (int8 rows included)
            or whose rank exceeds min(m, n), or a ``rank_map.json`` that differs from the
            config's.
    """
    rank_map = entry.get("rank_map")
    if not isinstance(rank_map, dict):
        raise CheckpointError(f"{path}: quantization_config has no rank_map")
    stored = _stored_factors(tensor_specs(path))
    layouts = entry.get("int8_layout") or {}
    for name, rank in rank_map.items():
        if rank is None:
            continue
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise CheckpointError(f"{path}: rank map gives {name} the rank {rank!r}, not a "
                                  "positive integer or null")
        _check_factor_shapes(path, name, rank, layouts.get(name) or {},
                             _factors_of(stored, name))
    side = path / "rank_map.json"
    if side.is_file():
        try:
            written = json.loads(side.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{side} is corrupt: {err}") from err
        if written != rank_map:
            differ = sorted(k for k in set(written) | set(rank_map)
                            if written.get(k) != rank_map.get(k))[:3]
            raise CheckpointError(f"{side} disagrees with the rank map in config.json "
                                  f"(first: {differ})")


def _stored_factors(specs: dict) -> dict[str, dict[str, list[int]]]:
    """{stored module name: {"weight_u": shape, "weight_v": shape}} from the shard headers."""
    stored: dict[str, dict[str, list[int]]] = {}
    for key, (_, shape) in specs.items():
        module, _, leaf = key.rpartition(".")
        if leaf in ("weight_u", "weight_v"):
            stored.setdefault(module, {})[leaf] = shape
    return stored


def _factors_of(stored: dict, name: str) -> dict | None:
    """The stored factor shapes of module ``name``. transformers saves some classes (LLaVA,
    for instance) under legacy key names, so when the name itself is not stored the longest
    tail of it that exactly one stored name ends with is used. Returns {} when the tail is
    ambiguous (not checkable) and None when nothing matches."""
    if name in stored:
        return stored[name]
    parts = name.split(".")
    for drop in range(1, len(parts) - 1):
        tail = ".".join(parts[drop:])
        matches = [key for key in stored if key == tail or key.endswith("." + tail)]
        if len(matches) == 1:
            return stored[matches[0]]
        if matches:
            return {}
    return None


def _check_factor_shapes(path: Path, name: str, rank: int, layout: dict,
                         factors: dict | None) -> None:
    if factors == {}:
        return
    u_int8, v_int8 = int(layout.get("u_int8", 0)), int(layout.get("v_int8", 0))
    u, v = (factors or {}).get("weight_u"), (factors or {}).get("weight_v")
    if u is None or v is None:
        raise CheckpointError(f"{path}: {name} has rank {rank} in the rank map but its "
                              "weight_u / weight_v factors are missing")
    (m, u_cols), (v_rows, n) = u, v
    if u_cols + u_int8 != rank or v_rows + v_int8 != rank:
        raise CheckpointError(f"{path}: {name} has rank {rank} in the rank map but its stored "
                              f"factors are {m}x{u_cols + u_int8} and {v_rows + v_int8}x{n}")
    if rank > min(m, n):
        raise CheckpointError(f"{path}: {name} has rank {rank} in the rank map, above "
                              f"min(m, n) = {min(m, n)} of its {m}x{n} weight")


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}


def tensor_specs(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """Returns {tensor name: (safetensors dtype, shape)} over a checkpoint's shards, read
    from the headers only (no weight is loaded)."""
    specs: dict[str, tuple[str, list[int]]] = {}
    for shard in _shard_files(Path(path)):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                specs[key] = (piece.get_dtype(), list(piece.get_shape()))
    return specs


def bytes_by_dtype(path: str | Path) -> dict[str, int]:
    """Returns {safetensors dtype: bytes} over every tensor of a checkpoint's shards, read
    from the headers only (no weight is loaded)."""
    totals: dict[str, int] = {}
    for dtype, shape in tensor_specs(path).values():
        count = 1
        for dim in shape:
            count *= dim
        totals[dtype] = totals.get(dtype, 0) + count * _DTYPE_BYTES.get(dtype, 0)
    return totals


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is corrupt: {err}") from err
        return [path / name for name in names]
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path} has no model.safetensors; not a complete checkpoint")
    return [single]


def safetensors_problem(path: Path) -> str | None:
    """Returns what is wrong with a safetensors file, or None when it is whole: it exists,
    its header parses and the file holds every byte the header lists (no tensor is read)."""
    if not path.is_file():
        return "the file is missing"
    try:
        with safe_open(path, framework="pt"):
            return None
    except Exception as err:  # noqa: BLE001 - safetensors raises several error types
        return str(err) or type(err).__name__


def _check_shard(shard: Path) -> None:
    if not shard.is_file():
        raise CheckpointError(f"shard {shard.name} is missing from {shard.parent}")
    problem = safetensors_problem(shard)
    if problem:
        raise CheckpointError(f"shard {shard} is corrupt or truncated: {problem}")


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: str = "cpu", verify: bool = True) -> nn.Module:
    """Loads a rankcut checkpoint, rebuilding its low-rank modules.

    Args:
        path: the checkpoint folder.
        dtype: parameter dtype (default: the dtype stored in config.json).
        device: where to place the model.
        verify: check every shard against its recorded sha256 first (see
            :func:`validate_checkpoint`).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: the folder is not a whole, readable rankcut checkpoint.
    """
    validate_checkpoint(path, verify=verify)
    register_with_transformers()
    kwargs = {"dtype": dtype} if dtype is not None else {"dtype": "auto"}
    from transformers import AutoConfig

    from ..architecture import auto_model_class, is_vision_language

    vlm = is_vision_language(AutoConfig.from_pretrained(str(path)))
    model = auto_model_class(vlm).from_pretrained(str(path), **kwargs)
    return model.to(device).eval()
