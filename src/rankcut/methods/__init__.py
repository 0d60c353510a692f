"""Compression methods: one frozen config dataclass per method, one file per method, and
a small registry.

A method says which statistics it needs (``needs_*``), how its ranks are allocated
(``allocation``) and how to decompose one weight matrix given its statistics; the engine
(``compression.engine``) gathers the statistics and applies the result. Adding a method
means writing a file with a config class, a decompose function and a ``MethodSpec``, then
registering it below.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..errors import ConfigError
from . import asvd, fwsvd, io_svd, svd, svd_llm, zero_sum
from .asvd import ASVDConfig
from .base import GRAD_BATCH_HELP, GRAD_SAMPLES_HELP, MethodConfig, MethodSpec, setting
from .fwsvd import FWSVDConfig
from .io_svd import SCORES, IOSVDConfig
from .svd import SVDConfig
from .svd_llm import SVDLLMConfig, SVDLLMV2Config
from .zero_sum import ZeroSumConfig

__all__ = ["ASVDConfig", "DEFAULT_METHOD", "FWSVDConfig", "GRAD_BATCH_HELP",
           "GRAD_SAMPLES_HELP", "IOSVDConfig", "METHODS", "MethodConfig", "MethodSpec",
           "SCORES", "SVDConfig", "SVDLLMConfig", "SVDLLMV2Config", "ZeroSumConfig",
           "make_config", "method_spec", "setting"]

METHODS: dict[str, MethodSpec] = {
    spec.config_cls.name: spec
    for spec in (svd.SPEC, svd_llm.SPEC, asvd.SPEC, fwsvd.SPEC, svd_llm.V2_SPEC, zero_sum.SPEC,
                 io_svd.SPEC)
}

#: The method ``rankcut compress`` uses when none is named.
DEFAULT_METHOD = IOSVDConfig.name


def method_spec(name: str) -> MethodSpec:
    """Returns the registered method called ``name``.

    Raises:
        ConfigError: no method has that name; the message lists the valid names.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def make_config(name: str, **settings: Any) -> MethodConfig:
    """Builds the config of method ``name`` from keyword settings, ignoring ``None`` values.

    Raises:
        ConfigError: unknown method, unknown setting, or a value out of range.
    """
    cls = method_spec(name).config_cls
    known = {f.name for f in fields(cls)}
    given = {k: v for k, v in settings.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"method {name!r} has no setting(s) {unknown}; it takes {sorted(known)}")
    return cls(**given)
