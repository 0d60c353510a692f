"""GGUF input: checking a file before transformers reads it, and loading it dequantized
as a plain dense model."""

from __future__ import annotations

import struct
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError

#: What transformers' GGUF reader raises, besides ValueError, on a file cut short.
GGUF_READ_ERRORS = (struct.error, IndexError)


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Loads a GGUF file with transformers, dequantized to ``dtype``, and its tokenizer.

    Raises:
        ModelLoadError: the file is missing, truncated or corrupt, or does not load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    check_gguf(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype,
            quantization_config=GgufConfig(dequantize=True))
    except (OSError, ValueError, KeyError, *GGUF_READ_ERRORS) as err:
        raise ModelLoadError(f"could not load the GGUF file {path}: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # the tokenizers library raises plain Exception on bad files
        raise ModelLoadError(f"could not load the tokenizer of {path}: {err}") from err
    drop_gguf_marks(model, path)
    return model, tokenizer


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
    except (OSError, ValueError, KeyError, EOFError, OverflowError, *GGUF_READ_ERRORS) as err:
        raise ModelLoadError(f"GGUF file {path} ({size:,} bytes) is truncated or corrupt: "
                             f"{err}") from err
    del reader  # closes the memory map
    if end > size:
        raise ModelLoadError(f"GGUF file {path} ({size:,} bytes) is truncated or corrupt: its "
                             f"tensor data ends at byte {end:,}")


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
