"""Pruning methods, one module per family, found by name.

A method is a `Method` subclass registered with `@register_method("key")`, whose `config` class
attribute is its own schema (a `MethodConfig` dataclass); `conf/pruner/<option>.yaml` files are
presets of it. Importing this package imports every module in it, so dropping a new module here
is all the registration there is.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..config import ConfigError
from .base import METHODS, Method, register_method

__all__ = ["METHODS", "Method", "method_class", "register_method"]

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def method_class(key: str) -> type[Method]:
    if key not in METHODS:
        raise ConfigError(f"invalid value pruner.method={key!r}: expected one of {sorted(METHODS)}")
    return METHODS[key]
