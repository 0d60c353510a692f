"""Named presets of compression settings (``rankcut compress --recipe best``).

A recipe is a method, its settings, an update and the update's settings, written out: the
run record and the checkpoint show the expanded settings, never just the recipe's name.
Settings given explicitly (on the command line, or as keyword arguments) win over the
recipe's.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

#: {recipe: {"method": name, "settings": method settings, "update": name, "update_settings":
#: update settings (a chain's prefixed with its step: ``block_lr``)}}. ``best`` is the
#: quality recipe of the README's "After truncation" section, chosen from its measurements.
RECIPES: dict[str, dict[str, Any]] = {
    "best": {
        "method": "io-svd",
        "settings": {},
        "update": "block+lora",
        "update_settings": {"block_lr": 1e-2, "block_lr_scale": "rms", "block_epochs": 5},
    },
}


def recipe(name: str) -> dict[str, Any]:
    """Returns the recipe called ``name`` (a copy).

    Raises:
        ConfigError: unknown recipe.
    """
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    entry = RECIPES[name]
    return {**entry, "settings": dict(entry["settings"]),
            "update_settings": dict(entry["update_settings"])}


def expand_flags(name: str, args: Any, default_method: str) -> None:
    """Fills the parsed command-line ``args`` with recipe ``name``'s settings where the user
    gave none (a setting flag left at None, ``--update none``). Mutates ``args``.

    Raises:
        ConfigError: unknown recipe, or a ``--method`` other than the recipe's.
    """
    entry = recipe(name)
    if args.method not in (default_method, entry["method"]):
        raise ConfigError(f"--recipe {name} compresses with --method {entry['method']}; drop "
                          f"--method {args.method} or the recipe")
    args.method = entry["method"]
    if args.update == "none":
        args.update = entry["update"]
    steps = args.update.split("+")
    chosen = {**entry["settings"], **{key: value for key, value in
                                      entry["update_settings"].items()
                                      if key.partition("_")[0] in steps}}
    for key, value in chosen.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def recipe_configs(name: str, ratio: float, **overrides: Any):
    """Builds the method config and update config of recipe ``name`` at ``ratio``.

    Args:
        name: a key of :data:`RECIPES`.
        ratio: the fraction of target-layer parameters to remove.
        **overrides: method settings, or update settings named as in the recipe
            (``block_epochs``), that replace the recipe's.

    Returns:
        (method config, update config).

    Raises:
        ConfigError: unknown recipe or setting, or a value out of range.
    """
    from .compression.update import make_update
    from .methods import make_config

    entry = recipe(name)
    steps = entry["update"].split("+")
    update_keys = {key for key in overrides if key.partition("_")[0] in steps}
    method_settings = {**entry["settings"],
                       **{k: v for k, v in overrides.items() if k not in update_keys}}
    update_settings = {**entry["update_settings"], **{k: overrides[k] for k in update_keys}}
    return (make_config(entry["method"], ratio=ratio, **method_settings),
            make_update(entry["update"], **update_settings))
