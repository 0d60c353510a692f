"""Loading models and finding what to compress in them, without per-architecture code."""

from __future__ import annotations

import fnmatch
import json
import logging
import struct
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, UnsupportedModelError
from .nn.modules import LowRankLinear

logger = logging.getLogger(__name__)

#: The name ``--model`` takes for the bundled SmolLM2-135M-Instruct (the default).
DEFAULT_MODEL = "smollm2"
#: Model names of the offline test vision-language models -> their ``vlm_assets`` layout.
TEST_VLMS = {"smollm2-llava": "llava", "smollm2-smolvlm": "smolvlm"}
#: What transformers' GGUF reader raises, besides ValueError, on a file cut short.
_GGUF_READ_ERRORS = (struct.error, IndexError)
#: Files that make up a saved tokenizer or processor; a folder with none of them has none.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "processor_config.json",
                   "preprocessor_config.json")


def resolve_model_source(source: str | Path | None) -> str:
    """Returns a loadable location for ``source``; ``None`` or ``"smollm2"`` is the bundled
    model and ``"smollm2-llava"`` / ``"smollm2-smolvlm"`` the offline test VLMs, built on
    first use (side effect: may download and convert the assets)."""
    if source is None or str(source) == DEFAULT_MODEL:
        from .offline.assets import ensure_smollm2

        return str(ensure_smollm2())
    if str(source) in TEST_VLMS:
        from .offline.vlm_assets import ensure_test_vlm

        return str(ensure_test_vlm(TEST_VLMS[str(source)]))
    return str(source)


def load_model(
    source: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
    verify: bool = True,
) -> tuple[nn.Module, object]:
    """Loads a causal LM and its tokenizer from a folder, a ``.gguf`` file or a hub id.

    A folder holding a rankcut checkpoint is rebuilt with its low-rank modules.

    Args:
        source: local HF folder, path to a ``.gguf`` file, hub id, or None for SmolLM2.
        dtype: parameter dtype of the loaded model.
        device: device to place the model on.
        verify: for a rankcut checkpoint, check every shard against the sha256 recorded at
            save time before loading (``False`` skips the extra read).

    Returns:
        (model in eval mode, tokenizer; for a vision-language model its processor, whose
        ``tokenizer`` attribute ``text_tokenizer`` returns).

    Raises:
        ModelLoadError: the path does not exist or nothing could be loaded from it: a
            truncated or corrupt GGUF file (:func:`check_gguf`) or safetensors shard
            (:func:`check_safetensors_folder`), or tokenizer files that do not load.
    """
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    location = resolve_model_source(source)
    path = Path(location).expanduser()
    kwargs: dict = {}
    model_kwargs: dict = {}
    if path.suffix == ".gguf":
        from transformers import GgufConfig

        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        check_gguf(path)
        kwargs["gguf_file"] = path.name
        model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
        location = str(path.parent)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model folder: it has no config.json")
        location = str(path)
        if _is_rankcut_checkpoint(path):
            from .io.checkpoint import validate_checkpoint

            validate_checkpoint(path, verify=verify)
        else:
            check_safetensors_folder(path)
    elif _looks_like_path(location):
        raise ModelLoadError(f"model path not found: {location}")
    try:
        vlm = "gguf_file" not in kwargs and is_vision_language(
            AutoConfig.from_pretrained(location))
        model = auto_model_class(vlm).from_pretrained(location, dtype=dtype, **kwargs,
                                                      **model_kwargs)
    except (OSError, ValueError, KeyError, *_GGUF_READ_ERRORS) as err:
        raise ModelLoadError(
            f"could not load '{source}' as a local model folder, GGUF file or hub id: {err}"
        ) from err
    tokenizer = _load_tokenizer(AutoProcessor if vlm else AutoTokenizer, location, source,
                                **kwargs)
    if "gguf_file" in kwargs:
        drop_gguf_marks(model, path)
    return model.to(device).eval(), tokenizer


def _load_tokenizer(loader, location: str, source, **kwargs):
    """Returns ``loader.from_pretrained(location, **kwargs)`` (a tokenizer or processor).

    Raises:
        ModelLoadError: it cannot be loaded: missing, or corrupt tokenizer files.
    """
    try:
        return loader.from_pretrained(location, **kwargs)
    except Exception as err:  # the tokenizers library raises plain Exception on bad files
        raise ModelLoadError(f"could not load the tokenizer of '{source}': {err}") from err


def load_saved_tokenizer(folder: str | Path, vision_language: bool = False):
    """Loads the tokenizer (a vision-language model's processor) saved in a model folder.

    Returns:
        The tokenizer or processor, or None when the folder holds none of
        :data:`TOKENIZER_FILES`.

    Raises:
        ModelLoadError: tokenizer files are there but cannot be loaded (corrupt or
            incomplete); the message names the folder.
    """
    from transformers import AutoProcessor, AutoTokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    loader = AutoProcessor if vision_language else AutoTokenizer
    return _load_tokenizer(loader, str(folder), folder)


def check_gguf(path: Path) -> None:
    """Checks that a GGUF file is whole before transformers reads it: its header, metadata
    and tensor table parse (``gguf.GGUFReader``, tensor data memory-mapped, not read) and
    every tensor's bytes lie inside the file.

    Raises:
        ModelLoadError: the file is truncated or corrupt; the message names it.
    """
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors),
                  default=int(reader.data_offset))
    except (OSError, ValueError, KeyError, EOFError, OverflowError, *_GGUF_READ_ERRORS) as err:
        raise ModelLoadError(f"GGUF file {path} ({size:,} bytes) is truncated or corrupt: "
                             f"{err}") from err
    del reader  # closes the memory map
    if end > size:
        raise ModelLoadError(f"GGUF file {path} ({size:,} bytes) is truncated or corrupt: its "
                             f"tensor data ends at byte {end:,}")


def check_safetensors_folder(folder: Path) -> None:
    """Checks the safetensors weights of a (dense) model folder before they are loaded:
    its shard index, when there is one, and every shard it names (headers only).

    Raises:
        ModelLoadError: the index or a shard is missing, truncated or corrupt.
    """
    from .io.checkpoint import safetensors_problem

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"{index} is corrupt: {err!r}") from err
    else:
        names = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    for name in names:
        if not (folder / name).is_file():
            raise ModelLoadError(f"weights file {folder / name}, named in {index.name}, is "
                                 "missing")
        problem = safetensors_problem(folder / name)
        if problem:
            raise ModelLoadError(f"weights file {folder / name} is truncated or corrupt: "
                                 f"{problem}")


def drop_gguf_marks(model: nn.Module, path: Path) -> None:
    """Turns a model transformers loaded (dequantized) from a GGUF file into a plain dense one.

    transformers loads a GGUF through its GGUF quantizer and leaves it attached (with a
    ``quantization_config`` on the config), which makes ``save_pretrained`` refuse the model
    as "not serializable". The weights are already dense ``dtype`` tensors, so the marks are
    removed. Side effect: mutates ``model`` and its config.

    Raises:
        ModelLoadError: a layer was left in GGUF's packed form (nothing to compress).
    """
    packed = [name for name, module in model.named_modules()
              if type(module).__name__.startswith(("Gguf", "GGUF", "Ggml"))]
    if packed:
        raise ModelLoadError(f"{path}: transformers kept {len(packed)} layer(s) packed in GGUF "
                             f"blocks (first: {packed[0]}); rankcut needs dense weights")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # transformers' own way to detach it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def gguf_as_folder(path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Returns a cached safetensors model folder converted from the GGUF file ``path``.

    ``--stream`` reads safetensors shards, which a GGUF has none of, so the file is loaded
    once, dequantized to ``dtype`` (the whole model in memory once: 4 bytes per parameter in
    float32), and saved with its tokenizer under ``<cache>/gguf/<stem>-<sha256[:16]>-<dtype>``;
    later runs on the same bytes reuse it. Built in a temporary folder renamed into place.

    Raises:
        ModelLoadError: the file is missing or cannot be loaded.
    """
    from .io.checkpoint import file_sha256
    from .offline.assets import COMPLETE_MARKER, build_folder, cache_dir

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    check_gguf(path)  # before hashing and before anything is written to the cache
    digest = file_sha256(path)
    dtype_name = str(dtype).removeprefix("torch.")
    target = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}-{dtype_name}"
    if (target / COMPLETE_MARKER).is_file():
        logger.info("using the cached conversion of %s: %s", path.name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to a %s safetensors folder for --stream (loads the whole "
                "model once): %s", path.name, dtype_name, target)

    def convert(tmp: Path) -> None:
        model, tokenizer = load_model(path, dtype=dtype)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_folder(target, f"{path.name} sha256={digest}", convert)


def load_config(source: str | Path | None):
    """Returns the transformers config of a model folder or hub id, without its weights.

    Raises:
        ModelLoadError: a path that does not exist, or nothing loadable there.
    """
    from transformers import AutoConfig

    location = resolve_model_source(source)
    path = Path(location).expanduser()
    if not path.exists() and _looks_like_path(location):
        raise ModelLoadError(f"model path not found: {location}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else location)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not read the config of '{source}': {err}") from err


def auto_model_class(vision_language: bool):
    """The transformers auto class that loads a causal LM, or a VLM
    (``AutoModelForImageTextToText``) when ``vision_language``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if vision_language else AutoModelForCausalLM


def text_tokenizer(tokenizer_or_processor):
    """The text tokenizer of a tokenizer or of a VLM processor."""
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


def _looks_like_path(location: str) -> bool:
    return location.startswith((".", "/", "~")) or location.count("/") > 1


def _is_rankcut_checkpoint(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "rankcut"


#: Attribute names tried, in order, for a model's language tower when ``get_decoder()``
#: gives none (LLaVA: ``language_model``, SmolVLM / Idefics3: ``text_model``).
TOWER_NAMES = ("language_model", "text_model")


def is_vision_language(model_or_config) -> bool:
    """Whether a model (or its config) has a vision side: a ``vision_config``."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "vision_config", None) is not None


def language_tower(model: nn.Module) -> tuple[str, nn.Module]:
    """Finds the language model inside ``model``: ``get_decoder()`` (transformers' own
    answer, for causal LMs and VLMs alike), else a sub-module named in ``TOWER_NAMES``,
    else the model itself when it has no vision side.

    Returns:
        (qualified name, "" for the model itself; the module).

    Raises:
        UnsupportedModelError: a vision-language model whose language tower none of these
            finds; the message names what was searched.
    """
    names = {id(m): n for n, m in model.named_modules()}
    get = getattr(model, "get_decoder", None)
    try:
        tower = get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        tower = None
    if isinstance(tower, nn.Module) and tower is not model and id(tower) in names:
        return names[id(tower)], tower
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TOWER_NAMES:
            return name, module
    if is_vision_language(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} has a vision side but no language tower was found: "
            f"searched get_decoder() and sub-modules named {', '.join(TOWER_NAMES)}")
    return "", model


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Finds the stack of decoder blocks: inside the language tower (``language_tower``),
    the longest ``nn.ModuleList`` whose every entry contains ``nn.Linear`` layers (or,
    once compressed, ``LowRankLinear`` layers). A VLM's vision tower is never picked.

    Returns:
        (qualified name of the list, the list).

    Raises:
        UnsupportedModelError: no such list exists (e.g. GPT-2's Conv1D layers), or a VLM
            has no recognisable language tower.
    """
    tower_name, tower = language_tower(model)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in tower.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if all(any(isinstance(m, (nn.Linear, LowRankLinear)) for m in block.modules())
               for block in module):
            if best is None or len(module) > len(best[1]):
                best = (".".join(filter(None, (tower_name, name))), module)
    if best is None:
        where = f" in {tower_name}" if tower_name else ""
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: searched every nn.ModuleList{where} "
            "for decoder blocks built from nn.Linear layers and found none"
        )
    return best


def select_targets(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, nn.Linear]:
    """Picks the ``nn.Linear`` modules to compress by glob patterns on qualified names.

    Args:
        model: the model.
        include: fnmatch patterns; default: everything inside the decoder blocks.
        exclude: fnmatch patterns removed from the selection.

    Returns:
        {qualified name: module}, in model order.

    Raises:
        UnsupportedModelError: no decoder blocks, or no ``nn.Linear`` matched.
    """
    prefix, _ = find_decoder_blocks(model)
    include = include or [f"{prefix}.*"]
    exclude = exclude or []
    targets = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(fnmatch.fnmatchcase(name, p) for p in include)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    }
    if not targets:
        raise UnsupportedModelError(
            f"no nn.Linear module matched include={include} exclude={exclude} "
            f"in {type(model).__name__}"
        )
    return targets


def block_index(name: str, prefix: str) -> int | None:
    """Returns the decoder block number of a module name under ``prefix``, or None."""
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def block_number(name: str) -> int | None:
    """Returns the first all-digit component of a qualified module name (3 in
    ``model.layers.3.mlp.up_proj``), or None: the block index when no prefix is known."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def module_type(name: str) -> str:
    """Returns the last part of a qualified module name (``q_proj``, ``down_proj``, ...)."""
    return name.rsplit(".", 1)[-1]
