"""What a model is made of, without per-architecture code: its language tower, its
decoder blocks, the linear layers to compress and the names they go by."""

from __future__ import annotations

import fnmatch

from torch import nn

from .errors import UnsupportedModelError
from .nn.modules import LowRankLinear


def auto_model_class(vision_language: bool):
    """The transformers auto class that loads a causal LM, or a VLM
    (``AutoModelForImageTextToText``) when ``vision_language``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if vision_language else AutoModelForCausalLM


def text_tokenizer(tokenizer_or_processor):
    """The text tokenizer of a tokenizer or of a VLM processor."""
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


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
