"""Lazy ``"module:attr"`` entries for the name → class registries (backends, strategies, encoders).

A registry may name a class by its import path so that optional heavy
dependencies (FAISS, transformers models) cost nothing until the name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError


def load_entry(entry: Any, what: str) -> Any:
    """``entry`` itself, or the object a ``"module:attr"`` string names (``attr`` may be dotted: ``Class.method``); a ConfigError naming ``what`` if it
    cannot be imported here."""
    if not isinstance(entry, str):
        return entry
    module, _, attr = entry.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what} is registered but cannot be loaded here ({exc})") from None
